"""Modules whose calls nest (a module that calls itself): call numbers count call starts, and the
output of call c is there once call c itself returned, after the outputs of the calls it made.

Oracle: forward pre-hooks and forward hooks on the same module, numbering calls as they start
(a stack pairs each output with its call), recording inputs and outputs and applying the same
edits as the trace.
"""

# ruff: noqa: B007, F841

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import assert_untouched
from torch import nn

import mediator

WIDTH = 4
DEPTH = 2  # the tree calls itself twice: calls 0 (outermost), 1 and 2 (innermost)
Edit = Callable[[torch.Tensor], torch.Tensor]


class Tree(nn.Module):
    """tanh(Linear(x)), plus what it computes from that one level deeper."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        if depth > 0:
            h = h + self(h, depth - 1)
        return h


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tree = Tree()
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tree(x, DEPTH))


@dataclass
class Seen:
    """What the hooks saw of the tree's calls, by call number, and the model's output."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # call numbers in the order the calls returned
    out: torch.Tensor | None = None


def hooked(net: Net, x: torch.Tensor, edits: dict[int, Edit] | None = None) -> Seen:
    """Run `net` with hooks that number the tree's calls as they start; `edits[c]` replaces the
    output of call c (after it is recorded)."""
    seen = Seen()
    running: list[int] = []

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        call = len(seen.inputs)
        seen.inputs[call] = args[0].detach().clone()
        running.append(call)

    def post(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        call = running.pop()
        seen.outputs[call] = output.detach().clone()
        seen.ends.append(call)
        return (edits or {}).get(call, lambda o: o)(output)

    handles = [net.tree.register_forward_pre_hook(pre), net.tree.register_forward_hook(post)]
    try:
        seen.out = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture
def net() -> Net:
    return Net()


def test_the_oracle_sees_nested_calls(net: Net) -> None:
    seen = hooked(net, torch.randn(2, WIDTH))
    assert seen.ends == [2, 1, 0]


def test_outputs_of_nested_calls_innermost_first(net: Net) -> None:
    model = mediator.Model(net)
    x = torch.randn(2, WIDTH)
    with model.trace(x) as tr:
        outputs = {}
        for step in tr.iter[[2, 1, 0]]:
            outputs[step] = model.tree.output.clone()
        out = model.output
    seen = hooked(net, x)
    for call in (0, 1, 2):
        torch.testing.assert_close(outputs[call], seen.outputs[call])
    torch.testing.assert_close(out, seen.out)
    assert_untouched(net)


def test_every_boundary_in_the_order_the_model_reaches_it(net: Net) -> None:
    model = mediator.Model(net)
    x = torch.randn(3, WIDTH)
    with model.trace(x) as tr:
        inputs, outputs = {}, {}
        for step in tr.iter[0:3]:
            inputs[step] = model.tree.input.clone()
        for step in tr.iter[[2, 1, 0]]:
            outputs[step] = model.tree.output.clone()
    seen = hooked(net, x)
    for call in (0, 1, 2):
        torch.testing.assert_close(inputs[call], seen.inputs[call])
        torch.testing.assert_close(outputs[call], seen.outputs[call])


@pytest.mark.parametrize("edited", [0, 1, 2])
def test_writing_one_call_of_a_module_that_calls_itself(net: Net, edited: int) -> None:
    model = mediator.Model(net)
    x = torch.randn(2, WIDTH)
    with model.trace(x) as tr:
        outputs = {}
        for step in tr.iter[[2, 1, 0]]:
            outputs[step] = model.tree.output.clone()
            if step == edited:
                model.tree.output = model.tree.output * 2 - 1
        out = model.output
    seen = hooked(net, x, {edited: lambda o: o * 2 - 1})
    for call in (0, 1, 2):
        torch.testing.assert_close(outputs[call], seen.outputs[call])
    torch.testing.assert_close(out, seen.out)
    assert_untouched(net)


def test_invokes_edit_and_read_different_calls(net: Net) -> None:
    model = mediator.Model(net)
    x1, x2 = torch.randn(2, WIDTH), torch.randn(3, WIDTH)
    with model.trace() as tr:
        with tr.invoke(x1):
            for step in tr.iter[2]:
                model.tree.output[:] = 0
            out1 = model.output
        with tr.invoke(x2):
            for step in tr.iter[[1, 0]]:
                last = model.tree.output.clone()
            out2 = model.output
    solo1 = hooked(net, x1, {2: torch.zeros_like})
    solo2 = hooked(net, x2)
    torch.testing.assert_close(out1, solo1.out)
    torch.testing.assert_close(last, solo2.outputs[0])
    torch.testing.assert_close(out2, solo2.out)


def test_the_outer_output_then_an_inner_one_is_out_of_order(net: Net) -> None:
    model = mediator.Model(net)
    ends = hooked(net, torch.randn(2, WIDTH)).ends
    assert ends.index(1) < ends.index(0)  # call 1 returned before call 0
    message = r"tree\.output \(call 1\) was requested after .* now at tree\.output \(call 0\)"
    with pytest.raises(mediator.OutOfOrderError, match=message):
        with model.trace(torch.randn(2, WIDTH)) as tr:
            for step in tr.iter[[0, 1]]:
                h = model.tree.output
    assert_untouched(net)
