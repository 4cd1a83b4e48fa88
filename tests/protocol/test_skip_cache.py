"""The check of a call that every row skips (`.skip(v)`) is cached: what the module would return
is learned by one fake run per module, module state and input shapes, and later traces compare
the skip values with stand-ins built from it. The check stays a check, and it leaves no reference
cycles.

Oracles: the number of fake runs (`_fake_forward`, counted), the shapes the plain module really
returns, a run of the plain model with a forward hook that returns the skip value (what the rest
of the model must see), and the cycle collector's garbage, as in test_memory.
"""

# ruff: noqa: F841

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MLP, assert_untouched
from torch import nn

import mediator
from mediator import ShapeError, _skips

WIDTH = 8


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fresh, empty cache, and the list that each fake run appends to."""
    monkeypatch.setattr(_skips, "_SPECS", OrderedDict())
    calls: list[int] = []
    fake_forward = _skips._fake_forward

    def counted(module: nn.Module, args: Any, kwargs: Any) -> Any:
        calls.append(1)
        return fake_forward(module, args, kwargs)

    monkeypatch.setattr(_skips, "_fake_forward", counted)
    return calls


def replaced(net: nn.Module, module: nn.Module, x: torch.Tensor, value: Any) -> Any:
    """The oracle: `net(x)` with `module`'s output replaced by `value`."""
    handle = module.register_forward_hook(lambda m, args, output: value)
    try:
        return net(x)
    finally:
        handle.remove()


def skip_trace(model: mediator.Model, layer: int, x: torch.Tensor, value: Any) -> Any:
    with model.trace(x):
        model.layers[layer].skip(value)
        out = model.output
    return out


def garbage_cycles_of(run: Callable[[], None], before_second: Callable[[], None]) -> list[str]:
    """Type names of the objects only the cycle collector could free after the second `run()`
    (the first compiles the with-bodies and warms PyTorch up), `before_second()` run between."""
    run()
    before_second()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return sorted({type(obj).__name__ for obj in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.collect()


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "fake run again"])
def test_a_whole_batch_skip_leaves_no_reference_cycles(runs: list[int], cached: bool) -> None:
    """Also when the module runs on fake tensors again (for shapes FakeTensorMode has met)."""
    net = MLP()
    model = mediator.Model(net)
    x = torch.randn(3, WIDTH)

    def run() -> None:
        with model.trace() as tr:
            with tr.invoke(x[:1]):
                model.layers[1].skip(torch.zeros(1, WIDTH))
            with tr.invoke(x[1:]):
                model.layers[1].skip(torch.ones(2, WIDTH))
                out = model.output
        assert out.shape == (2, WIDTH)
        skip_trace(model, 2, x, torch.zeros(3, WIDTH))

    assert garbage_cycles_of(run, (lambda: None) if cached else _skips._SPECS.clear) == []
    assert len(runs) == (2 if cached else 4)


def test_the_second_trace_of_the_same_shapes_does_not_run_the_fake_forward(
    runs: list[int],
) -> None:
    net = MLP()
    model = mediator.Model(net)
    x, v = torch.randn(3, WIDTH), torch.randn(3, WIDTH)
    first = skip_trace(model, 1, x, v)
    assert len(runs) == 1
    second = skip_trace(model, 1, x * 2, v)  # other values, the same shapes
    with model.trace() as tr:  # other invokes, the same batched shapes
        with tr.invoke(x[:2]):
            model.layers[1].skip(v[:2])
        with tr.invoke(x[2:]):
            model.layers[1].skip(v[2:])
            out = model.output
    assert len(runs) == 1
    torch.testing.assert_close(second, replaced(net, net.layers[1], x * 2, v))
    torch.testing.assert_close(out, replaced(net, net.layers[1], x[2:], v[2:]))
    assert_untouched(net)


def test_a_changed_module_input_or_mode_runs_the_fake_forward_again(runs: list[int]) -> None:
    net = MLP()
    model = mediator.Model(net)
    x = torch.randn(3, WIDTH)
    skip_trace(model, 3, x, torch.zeros(3, WIDTH))
    last = net.layers[3]
    last.weight = nn.Parameter(torch.randn(5, WIDTH))  # out-features 8 -> 5
    last.bias = nn.Parameter(torch.randn(5))
    assert last(x).shape == (3, 5)
    with pytest.raises(ShapeError, match=r"layers\.3\.output.*expected tensor\[3, 5\]"):
        skip_trace(model, 3, x, torch.zeros(3, WIDTH))
    assert len(runs) == 2
    v = torch.randn(3, 5)
    torch.testing.assert_close(skip_trace(model, 3, x, v), replaced(net, last, x, v))
    assert len(runs) == 2
    with pytest.raises(ShapeError, match=r"layers\.3\.output.*expected tensor\[4, 5\]"):
        skip_trace(model, 3, torch.randn(4, WIDTH), v)  # another input shape
    assert len(runs) == 3
    net.eval()  # a training flag
    skip_trace(model, 3, x, v)
    assert len(runs) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast: never cached
        for _ in range(2):  # the float32 value is cast to the bfloat16 the layer would give
            out = skip_trace(model, 3, x, v)
            assert out.dtype == torch.bfloat16
            assert torch.equal(out, torch.relu(v.bfloat16()))
    assert len(runs) == 6
    assert_untouched(net)


def test_a_wrong_skip_on_the_cached_path_is_still_a_shape_error(runs: list[int]) -> None:
    """The error names the module, the call, the user's line and the expected shape, for a
    single invoke and for the rows of one of two invokes (narrowed stand-ins)."""
    net = MLP()
    model = mediator.Model(net)
    x = torch.randn(3, WIDTH)
    skip_trace(model, 1, x, torch.zeros(3, WIDTH))
    for wrong in (
        torch.zeros(3, 5),
        torch.zeros(2, WIDTH),
        torch.zeros(3, WIDTH).to(torch.complex64),
    ):
        with pytest.raises(ShapeError) as info:
            skip_trace(model, 1, x, wrong)
        message = str(info.value)
        assert f"layers.1.output (call 0) at {__file__}:" in message
        assert "expected tensor[3, 8] float32 on cpu" in message
    with pytest.raises(ShapeError, match=r"layers\.1\.output.*expected tensor\[2, 8\] float32"):
        with model.trace() as tr:
            with tr.invoke(x[:1]):
                model.layers[1].skip(torch.zeros(1, WIDTH))
            with tr.invoke(x[1:]):
                model.layers[1].skip(torch.zeros(2, 5))
    assert len(runs) == 1
    assert net.layers[1].weight.grad is None
    assert_untouched(net)


class Pair(nn.Module):
    """Returns a tuple of a tensor, a None and a dict holding one more tensor and an int."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> Any:
        h = self.lin(x) * scale
        return h, None, {"mean": h.mean(-1), "n": 2}


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair()
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _, extra = self.pair(x, scale=0.5)
        return self.head(h) + extra["mean"][:, None]


def test_a_structured_output_is_cached_and_checked(runs: list[int]) -> None:
    net = PairNet()
    model = mediator.Model(net)
    x = torch.randn(3, WIDTH)
    value = (torch.randn(3, WIDTH), None, {"mean": torch.randn(3), "n": 2})
    outs = []
    for _ in range(2):
        with model.trace(x):
            model.pair.skip(value)
            outs.append(model.output)
    assert len(runs) == 1
    for out in outs:
        torch.testing.assert_close(out, replaced(net, net.pair, x, value))
    wrongs = [
        (value[0], "expected tuple of 3"),
        ((value[0], None, {"mean": torch.randn(3, 1), "n": 2}), r"expected tensor\[3\]"),
    ]
    for wrong, expected in wrongs:
        with pytest.raises(ShapeError, match=r"pair\.output \(call 0\).*" + expected):
            with model.trace(x):
                model.pair.skip(wrong)
    assert len(runs) == 1
    assert_untouched(net)


class Tagged(nn.Module):
    """Takes an object that is not a constant: a call with it is never cached."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(WIDTH, WIDTH)])

    def forward(self, x: torch.Tensor, tag: object = None) -> torch.Tensor:
        return self.layers[0](x)


def test_a_call_given_an_object_is_checked_every_time(runs: list[int]) -> None:
    net = Tagged()
    model = mediator.Model(net)
    x, tag = torch.randn(3, WIDTH), object()
    for _ in range(2):
        with model.trace(x, tag=tag):
            model.skip(torch.zeros(3, WIDTH))
    assert len(runs) == 2
    with pytest.raises(ShapeError, match=r"expected tensor\[3, 8\]"):
        with model.trace(x, tag=tag):
            model.skip(torch.zeros(3, 4))
    assert len(runs) == 3


def test_an_entry_is_for_its_own_module_only(runs: list[int]) -> None:
    """The weak reference in an entry, not the id in its key, decides: another module that
    sits at a freed one's address (ids are reused) does not get its entry."""
    net, other = MLP(), MLP()
    skip_trace(mediator.Model(net), 1, torch.randn(3, WIDTH), torch.zeros(3, WIDTH))
    ((key, entry),) = _skips._SPECS.items()
    module, forward = entry[0](), entry[1]()
    assert module is net.layers[1] and forward is not None
    assert _skips._cached(key, module, forward) is entry[2]
    assert _skips._cached(key, other.layers[1], forward) is _skips._NONE
    del net, module
    gc.collect()
    assert entry[0]() is None


def test_the_cache_keeps_the_entries_used_last(
    runs: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_skips, "_SPECS_SIZE", 2)
    net = MLP()
    model = mediator.Model(net)
    for rows in (1, 2, 1, 3):  # 1 is used again before 3 comes: 2 is the one evicted
        skip_trace(model, 1, torch.randn(rows, WIDTH), torch.zeros(rows, WIDTH))
    assert len(runs) == 3 and len(_skips._SPECS) == 2
    skip_trace(model, 1, torch.randn(1, WIDTH), torch.zeros(1, WIDTH))
    assert len(runs) == 3
    skip_trace(model, 1, torch.randn(2, WIDTH), torch.zeros(2, WIDTH))
    assert len(runs) == 4
