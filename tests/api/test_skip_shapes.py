"""`.skip(v)` when every row of the batch skips: the module does not run, yet a value of the wrong
shape is a `ShapeError` naming the module, the call and the user's line; and the skip values are
put together by the Batcher, so one with another batch dimension works.

Oracles: a solo run of the plain module with a forward hook that returns the skip value (what
the rest of the model must see), counters and hooks on the modules (which must not see any run
of the skipped module), and the shapes the plain module really returns.
"""

# ruff: noqa: F841

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import assert_untouched
from torch import nn

import mediator
from mediator import ShapeError

WIDTH = 8
HERE = re.escape(__file__)


class Counted(nn.Module):
    """relu(Linear(x)), applied in place to its input first (a module that edits its input),
    counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        torch.relu_(x)
        return torch.relu(self.lin(x))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Counted() for _ in range(3))
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x * 1)
        return self.head(x)


class Picky(nn.Module):
    """A module that fake tensors cannot run (its Python branches on a value)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum().item() > -1e9 else x


class PickyStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.picky = Picky()
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.picky(self.first(x)))


def line_of(marker: str) -> int:
    """The line of this file that ends in `marker`."""
    with open(__file__) as source:
        return next(n for n, text in enumerate(source, 1) if text.rstrip().endswith(marker))


def replaced(net: nn.Module, module: nn.Module, x: torch.Tensor, value: torch.Tensor) -> Any:
    """The oracle: `net(x)` with `module`'s output replaced by `value`."""
    handle = module.register_forward_hook(lambda m, args, output: value)
    try:
        return net(x)
    finally:
        handle.remove()


def test_the_oracle_module_keeps_its_shape() -> None:
    net = Stack()
    assert net.layers[1](torch.randn(2, WIDTH)).shape == (2, WIDTH)


def test_a_whole_batch_skip_of_the_right_shape_does_not_run_the_module() -> None:
    net = Stack()
    model = mediator.Model(net)
    seen: list[int] = []
    handle = net.layers[1].lin.register_forward_hook(lambda m, a, o: seen.append(1))
    x1, x2 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    v1, v2 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    try:
        with model.trace() as tr:
            with tr.invoke(x1):
                model.layers[1].skip(v1)
                out1 = model.output
            with tr.invoke(x2):
                before = model.layers[1].input.clone()
                model.layers[1].skip(v2)
                after = model.layers[1].input
                out2 = model.output
    finally:
        handle.remove()
    assert net.layers[1].calls == 0 and seen == []  # neither the module nor its parts ran
    torch.testing.assert_close(after, before)  # its in-place edit of the input did not happen
    torch.testing.assert_close(out1, replaced(net, net.layers[1], x1, v1))
    torch.testing.assert_close(out2, replaced(net, net.layers[1], x2, v2))
    assert_untouched(net)


@pytest.mark.parametrize(
    ("value", "shown"),
    [(torch.zeros(3, WIDTH), r"\[3, 8\]"), (torch.zeros(2, 5), r"\[2, 5\]")],
    ids=["rows", "width"],
)
def test_a_single_invoke_skip_of_the_wrong_shape(value: torch.Tensor, shown: str) -> None:
    net = Stack()
    model = mediator.Model(net)
    with pytest.raises(ShapeError) as info:
        with model.trace(torch.randn(2, WIDTH)):
            model.layers[1].skip(value)
            out = model.output
    message = str(info.value)
    assert re.search(r"layers\.1\.output \(call 0\) at " + HERE + r":\d+ \(skip\)", message)
    assert re.search(rf"got tensor{shown}.*expected tensor\[2, 8\]", message)
    assert net.layers[1].calls == 0
    assert_untouched(net)


@pytest.mark.parametrize(
    "wrong",
    [torch.zeros(2, WIDTH), torch.zeros(3, 5), torch.zeros(3, WIDTH, dtype=torch.complex64)],
)
def test_one_invoke_of_two_skips_with_the_wrong_shape(wrong: torch.Tensor) -> None:
    net = Stack()
    model = mediator.Model(net)
    with pytest.raises(ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(torch.randn(2, WIDTH)):
                model.layers[2].skip(torch.zeros(2, WIDTH))
            with tr.invoke(torch.randn(3, WIDTH)):
                model.layers[2].skip(wrong)  # the wrong one
    message = str(info.value)
    assert f"layers.2.output (call 0) at {__file__}:{line_of('# the wrong one')} (skip)" in message
    assert "expected tensor[3, 8] float32" in message
    assert net.layers[2].calls == 0
    assert_untouched(net)


def test_a_module_fake_tensors_cannot_run_is_checked_for_rows_and_structure() -> None:
    net = PickyStack()
    model = mediator.Model(net)
    x1, x2 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    v1, v2 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    with model.trace() as tr:
        with tr.invoke(x1):
            model.picky.skip(v1)
            out1 = model.output
        with tr.invoke(x2):
            model.picky.skip(v2)
            out2 = model.output
    torch.testing.assert_close(out1, replaced(net, net.picky, x1, v1))
    torch.testing.assert_close(out2, replaced(net, net.picky, x2, v2))
    wrongs = [
        (torch.zeros(3, WIDTH), torch.zeros(2, WIDTH), "rows 0:2 holds tensor[3, 8]"),
        (torch.zeros(1, WIDTH), torch.zeros(4, WIDTH), "rows 0:2 holds tensor[1, 8]"),
        (v1, torch.zeros(3, 5), "rows 2:5 holds tensor[3, 5]"),
        (v1, (v2,), "rows 2:5 is tuple of 1"),
    ]
    for first, second, wrong in wrongs:
        with pytest.raises(ShapeError) as info:
            with model.trace() as tr:
                with tr.invoke(x1):
                    model.picky.skip(first)  # first skip
                with tr.invoke(x2):
                    model.picky.skip(second)  # second skip
        message = str(info.value)
        lines = f"rows 0:2 at {__file__}:{line_of('# first skip')}; rows 2:5 at {__file__}:"
        assert f"picky.output (call 0), skipped for {lines}{line_of('# second skip')}" in message
        assert wrong in message
    assert_untouched(net)


class Columns(mediator.Batcher):
    """A batch dimension 1: inputs and values are [features, batch]."""

    def batch(self, inputs: Any, generate: bool = False) -> Any:
        given = [(index, entry[0][0]) for index, entry in enumerate(inputs) if entry is not None]
        rows: list[slice | None] = [None] * len(inputs)
        start = 0
        for index, x in given:
            rows[index] = slice(start, start + x.shape[1])
            start += x.shape[1]
        if len(given) == 1:
            rows = [None] * len(inputs)
        return ((torch.cat([x for _, x in given], dim=1),), {}), rows, start

    def narrow(self, value: Any, rows: slice, total: int) -> Any:
        return value[:, rows] if value.dim() == 2 and value.shape[1] == total else value

    def merge(self, full: Any, views: list[tuple[slice, Any]], total: int) -> Any:
        merged = full.clone()
        for rows, view in views:
            merged[:, rows] = view
        return merged

    def join(self, parts: list[tuple[slice, Any]], total: int) -> Any:
        return torch.cat([value for _, value in parts], dim=1)


class ColumnLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.weight @ x)


class ColumnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ColumnLayer() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_skip_values_are_joined_by_the_batcher() -> None:
    net = ColumnNet()
    model = mediator.Model(net, batcher=Columns())
    x1, x2 = torch.randn(WIDTH, 2), torch.randn(WIDTH, 2)
    v1, v2 = torch.randn(WIDTH, 2), torch.randn(WIDTH, 2)
    with model.trace() as tr:
        with tr.invoke(x1):
            model.layers[1].skip(v1)
            out1 = model.output
        with tr.invoke(x2):
            model.layers[1].skip(v2)
            out2 = model.output
    torch.testing.assert_close(out1, replaced(net, net.layers[1], x1, v1))
    torch.testing.assert_close(out2, replaced(net, net.layers[1], x2, v2))
    with pytest.raises(ShapeError, match=r"got tensor\[8, 3\].*expected tensor\[8, 2\]"):
        with model.trace() as tr:
            with tr.invoke(x1):
                model.layers[1].skip(v1)
            with tr.invoke(x2):
                model.layers[1].skip(torch.randn(WIDTH, 3))
    assert_untouched(net)
