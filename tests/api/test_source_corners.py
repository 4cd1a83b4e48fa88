"""`envoy.source` corner cases a user meets: private names in a forward, and a misspelt
operation of a nested `.source`; each read compared with the value computed by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import mediator


class Private(nn.Module):
    """A forward that reads a private attribute (`self.__scale`, mangled by its class)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.__scale = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x)) * self.__scale


def test_private_names_of_the_class_work_in_the_rewrite() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(Private())
    model = mediator.Model(net)
    x = torch.randn(2, 4)
    with torch.no_grad(), model.trace(x):
        tanh = model[0].source.tanh_0.output
        out = model.output
    with torch.no_grad():
        expected = torch.tanh(net[0].fc(x))
        torch.testing.assert_close(tanh, expected)
        torch.testing.assert_close(out, expected * 3.0)


def test_misspelt_nested_operation_fails_only_its_own_trace() -> None:
    net = tiny_llama(0, attn_implementation="eager")
    model = mediator.Model(net)
    inner = model.model.layers[0].self_attn.source.attention_interface_0.source
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        expected = net(ids, output_attentions=True).attentions[0]
        with pytest.raises(mediator.UsageError, match=r"no call named softmx_0; its calls:"):
            with model.trace(ids):
                inner.softmx_0.output  # noqa: B018 - misspelt
        with model.trace(ids):  # the model traces again, with and without the nested source
            logits = model.output.logits
        with model.trace(ids):
            weights = inner.softmax_0.output
    torch.testing.assert_close(logits, net(ids).logits)
    torch.testing.assert_close(weights, expected)
    with pytest.raises(AttributeError, match="softmax_0"):  # now known: an error at once
        inner.softmx_0  # noqa: B018


def test_first_source_after_reading_the_module_input() -> None:
    """`.source` used for the first time after the body read the module's own input: the
    forward has not run yet, so its operations are reached in this very call."""
    net = tiny_llama(2, attn_implementation="eager")
    model = mediator.Model(net)
    attention = model.model.layers[0].self_attn
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad(), model.trace(ids):
        hidden = attention.inputs[1]["hidden_states"]
        query = attention.source.q_proj_0.output
    with torch.no_grad():
        torch.testing.assert_close(query, net.model.layers[0].self_attn.q_proj(hidden))
