"""A value without rows (not batched along the batch dim the library knows for its module) is
handed whole to every invoke: one invoke of several writing it would change the others' results.

Oracles: a write by one invoke of several raises `ShapeError` naming the module, the invoke and
what to do; the same write alone, or from an invoke without inputs, equals plain forward hooks
doing it; reads are untouched.
"""

# ruff: noqa: F841

from __future__ import annotations

import pytest
import torch
from conftest import assert_untouched
from torch import nn

import mediator


class Weights(nn.Module):
    """Returns a `[3, 4]` parameter-derived value: it has no batch rows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self) -> torch.Tensor:
        return self.w * 1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weights = Weights()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        return self.lin(x) @ w.T


@pytest.fixture
def net():
    torch.manual_seed(5)
    net = Net()
    yield net
    assert_untouched(net)


def hooked(net: Net, x: torch.Tensor, scale: float) -> torch.Tensor:
    handle = net.weights.register_forward_hook(lambda m, i, o: o * scale)
    try:
        return net(x)
    finally:
        handle.remove()


X1, X2 = torch.randn(1, 4), torch.randn(3, 4)


def test_a_swap_by_one_invoke_of_several_is_a_shape_error(net):
    model = mediator.Model(net)
    with pytest.raises(
        mediator.ShapeError, match=r"weights.output.*invoke 0.*without rows"
    ) as info:
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(X1):
                model.weights.output = model.weights.output * 2
            with tr.invoke(X2):
                out = model.output
    assert "tr.invoke()" in str(info.value) and "batch_dims" in str(info.value)


def test_an_in_place_edit_by_one_invoke_of_several_is_a_shape_error(net):
    model = mediator.Model(net)
    with pytest.raises(mediator.ShapeError, match=r"weights.output.*invoke 1.*edited in place"):
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(X1):
                out = model.output
            with tr.invoke(X2):
                model.weights.output[:] = 0


def test_the_same_writes_alone_or_from_an_invoke_without_inputs_equal_hooks(net):
    model = mediator.Model(net)
    with torch.no_grad():
        with model.trace(X1):
            model.weights.output = model.weights.output * 2
            alone = model.output
        with model.trace() as tr:
            with tr.invoke(X1):
                first = model.output
            with tr.invoke(X2):
                second = model.output
            with tr.invoke():
                model.weights.output[:] *= 3
        torch.testing.assert_close(alone, hooked(net, X1, 2.0))
        torch.testing.assert_close(first, hooked(net, X1, 3.0))
        torch.testing.assert_close(second, hooked(net, X2, 3.0))


def test_reads_by_several_invokes_are_the_whole_value(net):
    model = mediator.Model(net)
    with torch.no_grad(), model.trace() as tr:
        with tr.invoke(X1):
            w1 = model.weights.output
        with tr.invoke(X2):
            w2 = model.weights.output
            out = model.output
    torch.testing.assert_close(w1, net.weights.w * 1)
    assert w2 is w1
    torch.testing.assert_close(out, net(X2))


class Pair(nn.Module):
    """Returns its batched input with a `[3, 4]` value that has no rows, nested in a list."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return x, [self.w * 1]


class Use(nn.Module):
    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w.T


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = Pair()
        self.use = Use()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, (w,) = self.pair(self.lin(x))
        return self.use(h, w)


@pytest.fixture
def pair_net():
    torch.manual_seed(6)
    net = PairNet()
    yield net
    assert_untouched(net)


def test_nested_and_input_writes_by_one_invoke_of_several_are_shape_errors(pair_net):
    model = mediator.Model(pair_net)
    with pytest.raises(mediator.ShapeError, match=r"pair.output.*invoke 0.*edited in place"):
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(X1):
                model.pair.output[1][0][:] = 0
            with tr.invoke(X2):
                pass
    with pytest.raises(mediator.ShapeError, match=r"use.input.*invoke 1.*replaced"):
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(X1):
                pass
            with tr.invoke(X2):
                (h, w), kwargs = model.use.inputs
                model.use.inputs = ((h, w * 0), kwargs)


def test_writes_that_keep_a_shared_value_or_come_from_the_whole_batch_equal_hooks(pair_net):
    model = mediator.Model(pair_net)
    with torch.no_grad():
        expected1 = pair_net(X1)
        with model.trace() as tr:
            with tr.invoke(X1):
                h, (w,) = model.pair.output
                model.pair.output = (h * 1, [w.clone()])  # the same values: no write to it
                first = model.output
            with tr.invoke(X2):
                second = model.output
            with tr.invoke():
                model.pair.output[1][0][:] = 0  # the whole batch's: allowed
        torch.testing.assert_close(first, torch.zeros_like(expected1))
        torch.testing.assert_close(second, torch.zeros(3, 3))
