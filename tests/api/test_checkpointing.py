"""Gradients under activation checkpointing: a trace on a checkpointed model gives the
gradients of the same trace without checkpointing, or refuses at once (reentrant checkpointing
with a write inside the checkpointed region).

Oracles: the same trace on the same weights without checkpointing (Hugging Face GPT-2 built from
a config, `gradient_checkpointing_enable()` with and without `use_reentrant`), and plain PyTorch
forward hooks doing the same edit on a model that calls `torch.utils.checkpoint` itself.
"""

# ruff: noqa: B018

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_untouched, hook_count, tiny_gpt2
from torch import nn
from torch.utils.checkpoint import checkpoint

import mediator

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

WIDTH = 8
REFUSED = "use_reentrant=True"

#: What `gradient_checkpointing_enable` gets: None is no checkpointing (the oracle).
FORMS = {"non-reentrant": False, "reentrant": True}


def saved_tensor_hooks_left() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


def param_grads(net: nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return grads


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


# =============================================================================================
# Hugging Face GPT-2: gradient_checkpointing_enable()
# =============================================================================================


def gpt2(reentrant: bool | None) -> nn.Module:
    """The same tiny GPT-2 every time, in train mode (so HF checkpoints) without dropout."""
    net = tiny_gpt2(0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    if reentrant is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
            net.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
    return net


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))


def keep_grad(h: torch.Tensor) -> torch.Tensor:
    """retain_grad where there is one: reentrant checkpointing computes its region without."""
    if h.requires_grad:
        h.retain_grad()
    return h


def reads(m: Any) -> list[torch.Tensor]:
    h = m.transformer.h[0].mlp.output
    return [keep_grad(h)]


def edits_in_place(m: Any) -> list[torch.Tensor]:
    m.transformer.h[0].attn.output[0][:, 1] = 0
    h = m.transformer.h[0].ln_2.output
    return [keep_grad(h)]


def swaps(m: Any) -> list[torch.Tensor]:
    h = m.transformer.h[0].ln_2.output
    keep_grad(h)
    m.transformer.h[0].ln_2.output = h * 2 + 1
    return [h]


def skips(m: Any) -> list[torch.Tensor]:
    x = m.transformer.h[1].mlp.input
    keep_grad(x)
    m.transformer.h[1].mlp.skip(torch.tanh(x) * 3)
    return [x]


def edits_an_input(m: Any) -> list[torch.Tensor]:
    x = m.transformer.h[0].mlp.c_proj.input
    keep_grad(x)
    m.transformer.h[0].mlp.c_proj.input = x * 0.5
    return [x]


WRITES = [edits_in_place, swaps, skips, edits_an_input]


def trace_grads(
    reentrant: bool | None, ids: torch.Tensor, program: Callable[[Any], list[torch.Tensor]]
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Run `program` in one invoke, backward after the trace: the values it read, their
    grads and every parameter's grad."""
    net = gpt2(reentrant)
    hooks = hook_count(net)
    model = mediator.Model(net)
    with model.trace(ids):
        read = program(model)
        logits = model.output.logits
    logits.pow(2).mean().backward()
    assert_untouched(net, hooks=hooks)
    assert not saved_tensor_hooks_left()
    grads = [r.grad if r.retains_grad else None for r in read]
    return [r.detach() for r in read], grads, param_grads(net)


@pytest.mark.parametrize("program", [reads, *WRITES], ids=lambda p: p.__name__)
def test_gpt2_non_reentrant_grads_equal_those_without_checkpointing(ids, program):
    want_values, want_grads, want_params = trace_grads(None, ids, program)
    values, grads, params = trace_grads(False, ids, program)
    for got, want in zip(values + grads, want_values + want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert_same_grads(params, want_params)


def test_gpt2_reentrant_reads_give_the_values_and_parameter_grads_without_checkpointing(ids):
    def read_only(m: Any) -> list[torch.Tensor]:
        return [m.transformer.h[0].mlp.output, m.transformer.h[1].attn.output[0]]

    want_values, _, want_params = trace_grads(None, ids, read_only)
    values, _, params = trace_grads(True, ids, read_only)
    for got, want in zip(values, want_values, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert_same_grads(params, want_params)


def test_gpt2_reentrant_write_to_a_whole_block_is_outside_the_region_and_exact(ids):
    def block_edit(m: Any) -> list[torch.Tensor]:
        out = m.transformer.h[0].output
        hidden = out[0] if isinstance(out, tuple) else out
        hidden[:, 2] = 0
        return []

    _, _, want_params = trace_grads(None, ids, block_edit)
    _, _, params = trace_grads(True, ids, block_edit)
    assert_same_grads(params, want_params)


@pytest.mark.parametrize("program", WRITES, ids=lambda p: p.__name__)
def test_gpt2_reentrant_write_inside_a_block_is_refused(ids, program):
    net = gpt2(True)
    hooks = hook_count(net)
    model = mediator.Model(net)
    with pytest.raises(mediator.UsageError) as caught:
        with model.trace(ids):
            program(model)
            model.output
    message = str(caught.value)
    block = "transformer.h.1" if program is skips else "transformer.h.0"
    assert f"forward of `{block}` checkpoints" in message
    assert f"{block}." in message.split(" was written")[0]  # the boundary written
    assert "by invoke 0" in message
    assert REFUSED in message and "gradient_checkpointing_disable()" in message
    assert "'use_reentrant': False" in message and "torch.no_grad()" in message
    assert_untouched(net, hooks=hooks)
    assert not saved_tensor_hooks_left()


def test_gpt2_reentrant_write_is_fine_without_grad(ids):
    want = gpt2(None)
    with torch.no_grad():
        model = mediator.Model(want)
        with model.trace(ids):
            swaps(model)
            expected = model.output.logits
        model = mediator.Model(gpt2(True))
        with model.trace(ids):
            swaps(model)
            logits = model.output.logits
    torch.testing.assert_close(logits, expected)


def two_invokes(
    reentrant: bool | None, ids: torch.Tensor, backward_in_body: bool
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
    """Two invokes with different edits inside the checkpointed blocks; the loss backward
    inside the last body or after the trace; a gradient hook on one read value."""
    net = gpt2(reentrant)
    hooks = hook_count(net)
    model = mediator.Model(net)
    with model.trace() as tr:
        with tr.invoke(ids[:1]):
            a = swaps(model)[0]
            first = model.output.logits
        with tr.invoke(ids[1:]):
            b = edits_in_place(model)[0]
            b.register_hook(lambda grad: grad * 3)
            second = model.output.logits
            if backward_in_body:
                (first.pow(2).sum() + second.pow(2).mean()).backward()
    if not backward_in_body:
        (first.pow(2).sum() + second.pow(2).mean()).backward()
    assert_untouched(net, hooks=hooks)
    assert not saved_tensor_hooks_left()
    return [a.grad, b.grad], param_grads(net)


@pytest.mark.parametrize("backward_in_body", [False, True], ids=["after", "inside"])
def test_gpt2_two_invokes_with_different_edits_non_reentrant(ids, backward_in_body):
    want_reads, want_params = two_invokes(None, ids, backward_in_body)
    reads_, params = two_invokes(False, ids, backward_in_body)
    for got, want in zip(reads_, want_reads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert_same_grads(params, want_params)


# =============================================================================================
# A model that calls torch.utils.checkpoint itself
# =============================================================================================


class Counted(nn.Linear):
    """A Linear that counts its calls (a recomputation calls it again)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


class Checkpointed(nn.Module):
    """embed, then three tanh(Linear) layers (checkpointed as one block unless `reentrant` is
    None), then a head. tanh saves its output: an edit that backward does not see shows."""

    def __init__(self, reentrant: bool | None, early_stop: bool = True) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.layers = nn.ModuleList(Counted(WIDTH, WIDTH) for _ in range(3))
        self.head = nn.Linear(WIDTH, 4)
        self.reentrant = reentrant
        self.early_stop = early_stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        if self.reentrant is None:
            x = self.block(x)
        elif self.reentrant:
            x = checkpoint(self.block, x, use_reentrant=True)
        else:
            x = checkpoint(self.block, x, use_reentrant=False, early_stop=self.early_stop)
        return self.head(x)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(4))


def hooked(
    x: torch.Tensor, edit: Callable[[torch.Tensor], torch.Tensor], edited: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain PyTorch, no checkpointing: layers[0]'s output replaced by `edit(output)` from a
    forward hook; returns the grad of that output (or of the `edited` one) and the
    parameters' grads."""
    net = Checkpointed(None)
    captured: list[torch.Tensor] = []

    def replace(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        new = edit(output)
        captured.append(new if edited else output)
        captured[0].retain_grad()
        return new

    handle = net.layers[0].register_forward_hook(replace)
    net(x).pow(2).sum().backward()
    handle.remove()
    return captured[0].grad, param_grads(net)


def double(h: torch.Tensor) -> torch.Tensor:
    return h * 2


def zero_first_column(h: torch.Tensor) -> torch.Tensor:
    h = h.clone()
    h[:, 0] = 0
    return h


@pytest.mark.parametrize("early_stop", [True, False])
def test_own_checkpoint_non_reentrant_swap_equals_plain_hooks(x, early_stop):
    want_h, want_params = hooked(x, double)
    net = Checkpointed(False, early_stop)
    model = mediator.Model(net)
    with model.trace(x):
        h = model.layers[0].output
        h.retain_grad()
        model.layers[0].output = h * 2
        out = model.output
    out.pow(2).sum().backward()
    torch.testing.assert_close(h.grad, want_h)
    assert_same_grads(param_grads(net), want_params)
    assert_untouched(net)


def test_own_checkpoint_non_reentrant_in_place_edit_inside_body_backward(x):
    want_h, want_params = hooked(x, zero_first_column, edited=True)
    net = Checkpointed(False)
    model = mediator.Model(net)
    with model.trace(x):
        h = model.layers[0].output
        h.retain_grad()
        h[:, 0] = 0
        model.output.pow(2).sum().backward()
    torch.testing.assert_close(h.grad, want_h)  # h was edited in place: the edited value's
    assert_same_grads(param_grads(net), want_params)
    assert_untouched(net)


def calls_per_layer(net: Checkpointed, run: Callable[[], torch.Tensor]) -> list[int]:
    """How often each checkpointed layer ran in `run()` and the backward of its sum."""
    for layer in net.layers:
        layer.calls = 0
    run().sum().backward()
    return [layer.calls for layer in net.layers]


def test_own_checkpoint_still_recomputes_what_comes_before_the_first_touched_boundary(x):
    net = Checkpointed(False)
    model = mediator.Model(net)
    assert calls_per_layer(net, lambda: net(x)) == [2, 2, 2]  # forward, then recomputed

    def read_layer_2() -> torch.Tensor:
        with model.trace(x):
            model.layers[2].output  # layers 0-2 ran before: nothing of the trace touched them
            out = model.output
        return out

    def write_first_input() -> torch.Tensor:
        with model.trace(x):
            model.layers[0].input = model.layers[0].input * 1  # the region's first boundary
            out = model.output
        return out

    assert calls_per_layer(net, read_layer_2) == [2, 2, 2]
    assert calls_per_layer(net, write_first_input) == [1, 1, 1]  # all kept: no recomputation


def test_own_checkpoint_reentrant_write_is_refused_naming_the_root(x):
    net = Checkpointed(True)
    model = mediator.Model(net)
    with pytest.raises(mediator.UsageError) as caught:
        with model.trace(x):
            model.layers[1].output[:, 0] = 0
            model.output
    message = str(caught.value)
    assert message.startswith("layers.1.output (call 0) was written by invoke 0")
    assert "the forward of the model (its root module) checkpoints" in message
    assert REFUSED in message
    assert_untouched(net)
    assert not saved_tensor_hooks_left()


def test_own_checkpoint_reentrant_second_invoke_write_is_refused_naming_it(x):
    net = Checkpointed(True)
    model = mediator.Model(net)
    with pytest.raises(mediator.UsageError, match="written by invoke 1, inside"):
        with model.trace() as tr:
            with tr.invoke(x[:2]):
                model.layers[1].output
            with tr.invoke(x[2:]):
                model.layers[1].output = model.layers[1].output * 2
    assert_untouched(net)


def test_write_in_a_plain_no_grad_part_of_the_model_is_not_refused(x):
    class Frozen(Checkpointed):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = self.block(self.embed(x))
            return self.head(x)

    net = Frozen(None)
    handle = net.layers[0].register_forward_hook(lambda m, a, o: o * 2)
    expected = net(x)
    expected.pow(2).sum().backward()
    handle.remove()
    want = param_grads(net)
    model = mediator.Model(net)
    with model.trace(x):
        model.layers[0].output = model.layers[0].output * 2
        out = model.output
    out.pow(2).sum().backward()
    torch.testing.assert_close(out, expected)
    assert_same_grads(param_grads(net), want)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("form", FORMS)
def test_after_the_trace_plain_forward_and_backward_equal_plain_pytorch(x, form):
    net = Checkpointed(FORMS[form])
    net(x).pow(2).sum().backward()
    want = param_grads(net)
    model = mediator.Model(net)
    with torch.no_grad() if form == "reentrant" else torch.enable_grad():
        with model.trace(x):
            model.layers[1].output = model.layers[1].output * 3
            model.output
    net(x).pow(2).sum().backward()
    assert_same_grads(param_grads(net), want)
    assert_untouched(net)
    assert not saved_tensor_hooks_left()


def test_a_trace_failing_or_stopped_inside_a_kept_region_leaves_nothing_behind(x):
    net = Checkpointed(False)
    model = mediator.Model(net)
    with pytest.raises(mediator.ShapeError):
        with model.trace(x):
            model.layers[0].output  # the region keeps its saved tensors from here on
            model.layers[1].output = torch.zeros(2, 3)
    assert not saved_tensor_hooks_left()
    with model.trace(x) as tr:
        h = model.layers[1].output
        tr.stop()
    assert not saved_tensor_hooks_left()
    assert_untouched(net)
    first = torch.tanh(net.layers[0](net.embed(x)))
    torch.testing.assert_close(h, net.layers[1](first))
