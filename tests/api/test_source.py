"""`envoy.source`: operations inside a forward read and written like modules, compared with the
intermediate computed by hand, Hugging Face's own attention weights, and hand-patched forwards."""

from __future__ import annotations

import functools
import types
from typing import Any

import pytest
import torch
from conftest import patched_forwards, tiny_llama
from torch import nn

import mediator

SCALE = 2.0


def _doubled(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) * 1.0

    return wrapper


def _make_attention() -> type[nn.Module]:
    scale = SCALE  # a closure variable of the forward

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        @_doubled
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.fc(x)
            w = torch.softmax(a * scale, -1)
            return w * x

    return Attention


Attention = _make_attention()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = Attention()
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            x = self.att(x)
        return self.out(x)


def _by_hand(net: Net, x: torch.Tensor) -> list[torch.Tensor]:
    weights = []
    for _ in range(2):
        w = torch.softmax(net.att.fc(x) * SCALE, -1)
        weights.append(w)
        x = w * x
    return weights


@pytest.fixture
def setup() -> tuple[Net, mediator.Model, torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    return net, mediator.Model(net), torch.randn(3, 5, 4)


def test_print_names_each_call(setup: Any) -> None:
    _, model, _ = setup
    shown = repr(model.att.source)
    assert "a = self.fc(x)" in shown and "# fc_0" in shown and "# softmax_0" in shown
    assert dir(model.att.source) == ["fc_0", "softmax_0"]


def test_reads_match_by_hand_with_call_numbers(setup: Any) -> None:
    net, model, x = setup
    with torch.no_grad(), model.trace(x) as tr:
        weights = []
        for _step in tr.iter[0:2]:
            weights.append(model.att.source.softmax_0.output)
    expected = _by_hand(net, x)
    for got, want in zip(weights, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert patched_forwards(net) == []
    assert type(net.att).forward is Attention.forward  # nothing of the rewrite is left


def test_write_matches_hand_patched_forward(setup: Any) -> None:
    net, model, x = setup
    with torch.no_grad():
        with model.trace(x):
            model.att.source.softmax_0.output[:, :, 0] = 0
            out = model.output

        def patched(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            w = torch.softmax(self.fc(x) * SCALE, -1)
            w[:, :, 0] = 0
            return w * x

        net.att.forward = types.MethodType(patched, net.att)
        try:
            expected = net(x)
        finally:
            del net.att.forward
    torch.testing.assert_close(out, expected)


def test_inputs_and_skip(setup: Any) -> None:
    net, model, x = setup
    with torch.no_grad(), model.trace(x):
        args, _ = model.att.source.softmax_0.inputs
        model.att.source.softmax_0.skip(torch.ones(3, 5, 4))
        out = model.att.output
    torch.testing.assert_close(args[0], net.att.fc(x) * SCALE)
    torch.testing.assert_close(out, x)  # w == 1


def test_several_invokes_equal_solo(setup: Any) -> None:
    _, model, x = setup

    def body(rows: torch.Tensor) -> torch.Tensor:
        model.att.source.softmax_0.output[:] = 0.5
        return model.output

    with torch.no_grad():
        with model.trace() as tr:
            both = [tr.invoke(x[:1]).run(body, x[:1]), tr.invoke(x[1:]).run(body, x[1:])]
        solo = []
        for part in (x[:1], x[1:]):
            with model.trace() as tr:
                solo.append(tr.invoke(part).run(body, part))
    for got, want in zip(both, solo, strict=True):
        torch.testing.assert_close(got.result(), want.result())


def test_errors_name_the_operation(setup: Any) -> None:
    _, model, x = setup
    with pytest.raises(AttributeError, match="softmax_0"):
        model.att.source.softmx_0  # noqa: B018
    with pytest.raises(mediator.OutOfOrderError, match=r"att\.source\.fc_0\.output"):
        with model.trace(x):
            model.att.source.softmax_0.output  # noqa: B018
            model.att.source.fc_0.output  # noqa: B018
    with pytest.raises(mediator.UsageError, match="inside an invoke body"):
        model.att.source.fc_0.output  # noqa: B018


def test_what_cannot_be_rewritten() -> None:
    class Lambda(nn.Module):
        forward = lambda self, x: x  # noqa: E731

    with pytest.raises(mediator.SourceUnavailableError, match="lambda"):
        mediator.Model(nn.Sequential(Lambda()))[0].source  # noqa: B018
    namespace: dict[str, Any] = {}
    exec("class Made(nn.Module):\n def forward(self, x):\n  return x + 1", {"nn": nn}, namespace)
    with pytest.raises(mediator.SourceUnavailableError, match="no source"):
        mediator.Model(nn.Sequential(namespace["Made"]()))[0].source  # noqa: B018


def test_plain_calls_untouched(setup: Any) -> None:
    net, model, x = setup
    model.att.source  # noqa: B018
    assert "forward" not in net.att.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))


def test_hf_attention_weights_and_nested_softmax() -> None:
    net = tiny_llama(0, attn_implementation="eager")
    model = mediator.Model(net)
    attention = model.model.layers[0].self_attn
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        expected = net(ids, output_attentions=True).attentions[0]
        with model.trace(ids):
            inner = attention.source.attention_interface_0.source.softmax_0.output
            weights = attention.source.attention_interface_0.output[1]
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(inner, expected)
    assert "def eager_attention_forward" in repr(attention.source.attention_interface_0.source)


def test_hf_head_ablation_matches_hand_patched_forward() -> None:
    net = tiny_llama(1, attn_implementation="eager")
    model = mediator.Model(net)
    ids = torch.randint(0, 100, (2, 6))
    head_dim = 16
    with torch.no_grad():
        with model.trace(ids):
            model.model.layers[1].self_attn.source.o_proj_0.input[:, :, :head_dim] = 0
            logits = model.output.logits
        o_proj = net.model.layers[1].self_attn.o_proj

        def ablate(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            hidden = args[0].clone()
            hidden[:, :, :head_dim] = 0
            return (hidden,)

        handle = o_proj.register_forward_pre_hook(ablate)
        try:
            expected = net(ids).logits
        finally:
            handle.remove()
    torch.testing.assert_close(logits, expected)


def test_accelerate_old_forward() -> None:
    hooks = pytest.importorskip("accelerate.hooks")
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 5, 4)
    hooks.add_hook_to_module(net.att, hooks.ModelHook())
    model = mediator.Model(net)
    with torch.no_grad(), model.trace(x):
        w = model.att.source.softmax_0.output
    torch.testing.assert_close(w, _by_hand(net, x)[0])
