"""On a GPU: a trace gives the values plain hooks give, and bodies run on the caller's stream.

Skipped where CUDA is not available (CI has no GPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import MLP

import mediator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_net() -> MLP:
    torch.manual_seed(0)
    return MLP().cuda()


def test_read_and_swap_match_hooks_on_cuda(cuda_net: MLP) -> None:
    model = mediator.Model(cuda_net)
    x = torch.randn(3, 8, device="cuda")
    with model.trace(x):
        h = model.layers[1].output
        model.layers[1].output = h * 2
        out = model.output

    seen = {}

    def double(module, args, output):
        seen["h"] = output
        return output * 2

    handle = cuda_net.layers[1].register_forward_hook(double)
    try:
        expected = cuda_net(x)
    finally:
        handle.remove()
    assert h.device.type == "cuda"
    assert torch.equal(h, seen["h"])
    assert torch.equal(out, expected)


def test_bodies_run_on_the_callers_stream_and_device(cuda_net: MLP) -> None:
    model = mediator.Model(cuda_net)
    x = torch.randn(4, 8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        with model.trace() as tr:
            with tr.invoke(x[:2]):
                first_stream = torch.cuda.current_stream()
                first_device = torch.cuda.current_device()
                h = model.layers[2].output
                scaled = h * 3  # computed on the caller's stream
            fut = tr.invoke(x[2:]).run(lambda: torch.cuda.current_stream())
        side.synchronize()
    assert first_stream == side
    assert fut.result() == side
    assert first_device == torch.cuda.current_device()

    seen = {}
    handle = cuda_net.layers[2].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    try:
        cuda_net(x)
    finally:
        handle.remove()
    torch.testing.assert_close(scaled, seen["h"][:2] * 3)
