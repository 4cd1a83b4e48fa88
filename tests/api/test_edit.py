"""`model.edit()`: persistent interventions, compared with a forward-hook oracle in traces,
generation and plain calls, composed with a trace's own interventions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import mediator

FACTOR = 3.0


def _hooked(module: nn.Module, hook: Callable[..., Any], run: Callable[[], Any]) -> Any:
    handle = module.register_forward_hook(hook)
    try:
        return run()
    finally:
        handle.remove()


def _scale(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * FACTOR


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_edit_in_traces_calls_and_invokes(net: nn.Sequential) -> None:
    model = mediator.Model(net)
    x = torch.randn(3, 4)
    with model.edit() as edited:
        model[0].output[:] = model[0].output * FACTOR
    with torch.no_grad():
        expected = _hooked(net[0], _scale, lambda: net(x))
        torch.testing.assert_close(edited(x), expected)  # a plain call applies it
        torch.testing.assert_close(model(x), net(x))  # `model` is untouched
        with edited.trace() as tr:
            with tr.invoke(x[:2]):
                first = edited.output
            with tr.invoke(x[2:]):
                model[2].output[:] = 0  # composed with the edit, after it
                second = edited.output
    torch.testing.assert_close(first, expected[:2])
    torch.testing.assert_close(second, torch.zeros(1, 2))
    assert "forward" not in net[0].__dict__


def test_trace_reads_see_the_edit(net: nn.Sequential) -> None:
    model = mediator.Model(net)
    x = torch.randn(2, 4)
    edited = model.edit().run(lambda: model[0].output.mul_(FACTOR))
    with torch.no_grad(), edited.trace(x):
        h = edited[0].output.clone()
    torch.testing.assert_close(h, net[0](x) * FACTOR)


def test_inplace_and_clear(net: nn.Sequential) -> None:
    model = mediator.Model(net)
    x = torch.randn(2, 4)
    same = model.edit(inplace=True).run(lambda: model[0].output.mul_(FACTOR))
    assert same is model
    with torch.no_grad():
        torch.testing.assert_close(model(x), _hooked(net[0], _scale, lambda: net(x)))
        model.clear_edits()
        torch.testing.assert_close(model(x), net(x))


def test_edit_in_generation() -> None:
    net = tiny_llama(0)
    model = mediator.Model(net)
    ids = torch.randint(0, 100, (1, 5))
    layer = net.model.layers[0]
    with model.edit() as edited:
        model.model.layers[0].output[:] = 0  # at step 0: the pass over the prompt

    calls = []

    def zero_first(module: nn.Module, args: Any, output: torch.Tensor) -> Any:
        calls.append(1)
        return torch.zeros_like(output) if len(calls) == 1 else output

    options = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        expected = _hooked(layer, zero_first, lambda: net.generate(ids, **options))
        with edited.generate(ids, **options) as tr:
            pass
    torch.testing.assert_close(tr.result, expected)


def test_edit_with_source() -> None:
    class Soft(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x, -1) + 1

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 4), Soft())
    model = mediator.Model(module)
    x = torch.randn(2, 4)
    with model.edit() as edited:
        model[1].source.softmax_0.output[:] = 0
    with torch.no_grad():
        torch.testing.assert_close(edited(x), torch.ones(2, 4))
        torch.testing.assert_close(model(x), module(x))
