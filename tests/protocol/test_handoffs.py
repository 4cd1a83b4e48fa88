"""How many thread handoffs a trace makes: the design's cost model, counted exactly.

Every handoff is one `put` on a thread's queue (a mediator's inbox, the model thread's inbox, or
an idle worker's job queue); the interleaver counts them as it makes them (`tr._handoffs`). The
counts below are what the protocol in `_interleaver.py` promises: a read is one round trip, a
write needs no answer, and N mediators that run at the same point cost N + 1 handoffs (the baton
goes from one to the next), not 2N. Values are checked against plain forward hooks so that a
cheap but wrong trace cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import MLP

import mediator


def _count(run: Callable[[], mediator.Tracer]) -> int:
    """The handoffs of the trace `run()` makes (after a warm-up, so the pool has its size)."""
    run()
    return run()._handoffs


def _hooked_outputs(net: MLP, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    handles = [
        net.layers[i].register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, o))
        for i in layers
    ]
    try:
        net(x)
    finally:
        for handle in handles:
            handle.remove()
    return [seen[i] for i in layers]


@pytest.mark.parametrize("reads", [0, 1, 3, 6])
def test_each_read_is_one_round_trip(reads: int) -> None:
    net = MLP(depth=6)
    model = mediator.Model(net)
    x = torch.randn(2, 8)
    got: list[torch.Tensor] = []

    def body() -> None:
        got.extend(model.layers[i].output for i in range(reads))

    def run() -> mediator.Tracer:
        got.clear()
        with model.trace() as tr:
            tr.invoke(x).run(body)
        return tr

    # start: a job to a worker and the baton back; then a put each way per read
    assert _count(run) == 2 + 2 * reads
    for value, expected in zip(got, _hooked_outputs(net, x, list(range(reads))), strict=True):
        torch.testing.assert_close(value, expected)


def test_writes_need_no_answer() -> None:
    net = MLP()
    model = mediator.Model(net)
    x = torch.randn(2, 8)
    out: list[torch.Tensor] = []

    def body() -> None:
        for i in range(3):
            model.layers[i].output = torch.zeros(2, 8)

    def run() -> mediator.Tracer:
        with model.trace() as tr:
            tr.invoke(x).run(body)
        out.append(tr.result)
        return tr

    assert _count(run) == 2  # only the start: swaps are applied without a handoff
    handles = [
        layer.register_forward_hook(lambda m, a, o: torch.zeros_like(o)) for layer in net.layers[:3]
    ]
    try:
        expected = net(x)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out[-1], expected)


@pytest.mark.parametrize("invokes", [2, 5, 16])
def test_invokes_start_and_meet_along_one_chain(invokes: int) -> None:
    net = MLP()
    model = mediator.Model(net)
    xs = [torch.randn(1, 8) for _ in range(invokes)]
    got: list[torch.Tensor] = []

    def read(layer: int) -> None:
        got.append(model.layers[layer].output)

    def at(layers: list[int]) -> mediator.Tracer:
        got.clear()
        with model.trace() as tr:
            for x, layer in zip(xs, layers, strict=True):
                tr.invoke(x).run(read, layer)
        return tr

    # each invoke reads a layer of its own (layers cycle if there are more invokes than layers):
    # N + 1 to start them all, then a round trip per read, except that invokes due at the same
    # layer are served along one chain (one put each, one back)
    layers = [i % len(net.layers) for i in range(invokes)]
    due_at = {layer: layers.count(layer) for layer in layers}
    expected = invokes + 1 + sum(count + 1 for count in due_at.values())
    assert _count(lambda: at(layers)) == expected
    batch = torch.cat(xs)
    hooked = _hooked_outputs(net, batch, sorted(set(layers)))
    by_layer = dict(zip(sorted(set(layers)), hooked, strict=True))
    # the invokes were served in layer order; their values are their own rows
    served = sorted(range(invokes), key=lambda i: (layers[i], i))
    for value, i in zip(got, served, strict=True):
        torch.testing.assert_close(value, by_layer[layers[i]][i : i + 1])
    # all at the same layer: N + 1 to start, N + 1 to serve
    assert _count(lambda: at([1] * invokes)) == 2 * invokes + 2
