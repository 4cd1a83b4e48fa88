"""Fault injection: an exception raised at any point of the protocol (and the
states of `_interleaver.py`) ends the trace with THAT exception, and leaves nothing behind: no
busy mediator worker, no tap or hook on the model, and `net(x)` computes what it computed before.

Points covered: before a body's first request; right after a VALUE is received; in a SWAP (a
value whose computation raises, and swaps applied later that fail at a future boundary); at a
SKIP; at a BARRIER (another party raises); after a body's END while others still run; inside the
model's forward (a module raising at its call k); inside `generate`; during batching (the
Batcher's `batch`, `narrow`, `merge`); in a cache; while a body waits on `tr.result`; and a real
SIGINT (Ctrl-C) sent to the main thread while the model runs, while the main thread waits for a
busy body, and while a body waits at a barrier.

Faults are injected through public ways (the body, the model, a Batcher subclass, a TinyLM
subclass). The only internal point patched is `Cache.record` (nothing public runs code there).
"""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B007, B018, F841

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import MLP, busy_workers, hook_count, patched_forwards
from torch import nn

import mediator
from mediator import ShapeError, UsageError, _workers
from mediator._cache import Cache
from mediator.models import TinyLM, TinyLMConfig


class Boom(Exception):
    """The exception every fault raises; tests check the trace ends with the very same object."""


@pytest.fixture
def err() -> Boom:
    return Boom("injected fault")


def explode(error: BaseException) -> Callable[..., Any]:
    """A function that raises `error` whatever it is given (a value whose computation fails)."""

    def compute(*args: Any, **kwargs: Any) -> Any:
        raise error

    return compute


def assert_clean(net: nn.Module, x: torch.Tensor, reference: torch.Tensor, hooks: int) -> None:
    """Nothing of the failed trace is left, and the model computes what it computed before."""
    assert busy_workers() == []
    assert patched_forwards(net) == []
    assert hook_count(net) == hooks
    with torch.no_grad():
        assert torch.equal(net(x), reference)


def retrace(model: mediator.Model, net: nn.Module, x: torch.Tensor) -> None:
    """The model traces normally after the fault."""
    with model.trace(x):
        out = model.output
    with torch.no_grad():
        assert torch.equal(out, net(x))


@pytest.fixture
def clean(net, model, x) -> Iterator[Callable[[], None]]:
    """`clean()` asserts that the conftest MLP is as it was before the test."""
    with torch.no_grad():
        reference = net(x)
    hooks = hook_count(net)

    def check() -> None:
        assert_clean(net, x, reference, hooks)
        retrace(model, net, x)

    yield check


def outputs_of(net: nn.Module, x: torch.Tensor, *modules: nn.Module) -> list[Any]:
    """Plain-PyTorch oracle: what forward hooks on `modules` see in `net(x)`, in call order."""
    seen: list[Any] = []
    handles = [m.register_forward_hook(lambda m, a, o: seen.append(o)) for m in modules]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


# == before the first request of a body ======================================================


def test_raise_before_the_first_request_single_body(model, x, err, clean):
    with pytest.raises(Boom) as info:
        with model.trace(x):
            raise err
    assert info.value is err
    clean()


def test_raise_before_the_first_request_in_the_first_invoke(model, x, err, clean):
    """Invoke 0 fails while the trace starts its bodies: invoke 1's body never runs."""
    reached: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                raise err
            with tr.invoke(x):
                reached.append("invoke 1 started")
                b = model.layers[0].output
    assert info.value is err
    assert reached == []
    clean()


def test_raise_before_the_first_request_in_an_empty_invoke(model, x, err, clean):
    reached: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.layers[2].output
                reached.append("invoke 0 resumed")
            with tr.invoke():
                raise err
    assert info.value is err
    assert reached == []  # invoke 0 was cancelled while it waited, never resumed
    clean()


def test_raise_before_the_first_request_function_form(model, x, err, clean):
    def waits() -> torch.Tensor:
        return model.layers[3].output

    def fails() -> None:
        raise err

    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            first = tr.invoke(x).run(waits)
            second = tr.invoke(x).run(fails)
    assert info.value is err
    assert second.exception(timeout=0) is err
    assert first.done() and first.exception(timeout=0) is not None
    clean()


# == right after a VALUE is received ========================================================

POINTS = {
    "layers.0.input": lambda m: m.layers[0].input,
    "layers.1.output": lambda m: m.layers[1].output,
    "layers.3.inputs": lambda m: m.layers[3].inputs,
    "model.output": lambda m: m.output,
}


@pytest.mark.parametrize("raiser", [0, 1, 2])
@pytest.mark.parametrize("point", list(POINTS))
def test_raise_right_after_a_value_is_received(model, net, x, err, clean, point, raiser):
    """Three invokes read the same point, then a later one; invoke `raiser` raises as soon as it
    has its value. Invokes before it were served (in definition order), invokes after it never
    are, and nobody gets past the later point."""
    read = POINTS[point]
    served: list[int] = []
    later: list[int] = []

    def body(index: int) -> None:
        value = read(model)
        served.append(index)
        if index == raiser:
            raise err
        if point != "model.output":
            model.output
            later.append(index)

    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            futures = [tr.invoke(x[i : i + 1]).run(body, i) for i in range(3)]
    assert info.value is err
    assert served == list(range(raiser + 1))
    assert later == []
    assert futures[raiser].exception(timeout=0) is err
    assert all(future.done() for future in futures)
    clean()


def test_raise_after_a_value_in_a_with_body_while_others_wait(model, net, x, err, clean):
    """With-bodies: invoke 1 raises right after its read; invoke 0 waits for a later layer and
    invoke 2 waits for the same layer (due after invoke 1): neither is resumed."""
    resumed: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.layers[3].output
                resumed.append("invoke 0")
            with tr.invoke(x):
                b = model.layers[1].output
                raise err
            with tr.invoke(x):
                c = model.layers[1].output
                resumed.append("invoke 2")
    assert info.value is err
    assert resumed == []
    clean()


# == SWAP ===================================================================================


def test_swap_whose_value_computation_raises(model, x, err, clean):
    with pytest.raises(Boom) as info:
        with model.trace(x):
            model.layers[1].output = explode(err)(model.layers[1].output)
            out = model.output
    assert info.value is err
    clean()


def test_swap_value_computation_raises_in_one_invoke_of_two(model, x, err, clean):
    resumed: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[2].output = model.layers[2].output * 2
                a = model.output
                resumed.append("invoke 0")
            with tr.invoke(x[:2]):
                model.layers[2].output = explode(err)(model.layers[2].output)
    assert info.value is err
    assert resumed == []
    clean()


def test_swap_of_the_wrong_shape_after_the_body_ended(model, x, clean):
    """The body set a future value and ended (END): the failing shape check at that boundary
    has no request to raise at, so it ends the trace."""
    with pytest.raises(ShapeError, match=r"layers\.2\.output \(call 0\)") as info:
        with model.trace(x):
            h = model.layers[0].output
            model.layers[2].output = torch.zeros(3, 5)
    assert "[3, 8]" in str(info.value) and "[3, 5]" in str(info.value)
    assert h.shape == (3, 8)  # bound before the failure, written back
    clean()


def test_swap_of_the_wrong_shape_while_another_invoke_waits_there(model, x, clean):
    """Invoke 0's swap fails at layer 2; invoke 1 waits for layer 2's output too (served after
    invoke 0 at that boundary) and must not get a value."""
    resumed: list[str] = []
    with pytest.raises(ShapeError, match=r"layers\.2\.output"):
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[2].output = torch.zeros(1, 8)
                a = model.output
            with tr.invoke(x):
                b = model.layers[2].output
                resumed.append("invoke 1")
    assert resumed == []
    clean()


def test_swap_caught_at_the_blocked_request_is_discarded(model, net, x, clean):
    """The late ShapeError is raised at the request the body is blocked on; a body that catches
    it goes on, and the model computes as if the swap had never been set."""
    caught: list[str] = []
    with model.trace(x):
        model.layers[1].output = torch.zeros(2, 8)
        try:
            out = model.output
        except ShapeError as error:
            caught.append(str(error))
            out = model.output
    assert len(caught) == 1 and "layers.1.output (call 0)" in caught[0]
    with torch.no_grad():
        assert torch.equal(out, net(x))
    clean()


class ExplodingDict(dict):
    """A replacement value whose inspection raises (the swap's check itself fails)."""

    error: BaseException

    def keys(self) -> Any:
        raise self.error


@pytest.mark.parametrize("when", ["at-the-current-boundary", "at-a-future-boundary", "after-end"])
def test_swap_whose_check_raises_a_foreign_exception(model, x, err, clean, when):
    bad = ExplodingDict()
    bad.error = err
    with pytest.raises(Boom) as info:
        with model.trace(x):
            if when == "at-the-current-boundary":
                h = model.layers[2].output
            model.layers[2].output = bad
            if when != "after-end":
                out = model.output
    assert info.value is err
    clean()


class NoArgs(nn.Module):
    """A module called without arguments: it has no `.input` to set."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self) -> torch.Tensor:
        return self.bias


class WithNoArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.bias = NoArgs()
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x) + self.bias())


def test_swap_whose_apply_fails_at_a_future_boundary(x):
    """`.input = v` for a call without arguments fails only when the call comes (the swap's
    own function raises at the boundary); the body gets it at its blocked request."""
    torch.manual_seed(21)
    net = WithNoArgs()
    with torch.no_grad():
        reference = net(x)
    model = mediator.Model(net)
    with pytest.raises(UsageError, match=r"model\.bias was called without arguments") as info:
        with model.trace(x):
            h = model.first.output
            model.bias.input = torch.zeros(8)
            out = model.output
    assert "bias" in str(info.value)
    assert_clean(net, x, reference, 0)
    retrace(model, net, x)


# == SKIP ===================================================================================


def test_raise_right_after_setting_a_skip(model, net, x, err, clean):
    ran: list[int] = []
    handle = net.layers[2].register_forward_hook(lambda m, a, o: ran.append(1))
    try:
        with pytest.raises(Boom) as info:
            with model.trace(x):
                model.layers[2].skip(torch.zeros(3, 8))
                raise err
    finally:
        handle.remove()
    assert info.value is err
    assert ran == []  # the forward never got there
    clean()


def test_skip_value_computation_raises(model, x, err, clean):
    with pytest.raises(Boom) as info:
        with model.trace(x):
            model.layers[2].skip(explode(err)(model.layers[2].input))
            out = model.output
    assert info.value is err
    clean()


def test_skip_of_the_wrong_shape_in_one_invoke_of_two(model, x, clean):
    with pytest.raises(ShapeError, match=r"layers\.1\.output \(call 0\)") as info:
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[1].skip(torch.zeros(3, 5))
            with tr.invoke(x[:2]):
                b = model.output
    assert "[3, 8]" in str(info.value)
    clean()


def test_another_invoke_raises_at_the_skipped_call(model, net, x, err, clean):
    """Invoke 0 skips layer 2 and waits; invoke 1 is served layer 2's input (the same boundary,
    after invoke 0) and raises: layer 2 never runs."""
    ran: list[int] = []
    handle = net.layers[2].register_forward_hook(lambda m, a, o: ran.append(1))
    try:
        with pytest.raises(Boom) as info:
            with model.trace() as tr:
                with tr.invoke(x):
                    model.layers[2].skip(torch.zeros(3, 8))
                    a = model.output
                with tr.invoke(x):
                    b = model.layers[2].input
                    raise err
    finally:
        handle.remove()
    assert info.value is err
    assert ran == []
    clean()


# == BARRIER ================================================================================


@pytest.mark.parametrize("parties", [2, 3])
def test_a_party_raises_while_others_wait_at_the_barrier(model, x, err, clean, parties):
    after: list[int] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            bar = tr.barrier(parties)
            with tr.invoke(x):
                a = model.layers[0].output
                bar()
                after.append(0)
            with tr.invoke(x):
                b = model.layers[1].output
                if parties == 3:
                    bar()
                    after.append(1)
                else:
                    raise err
            with tr.invoke(x):
                c = model.layers[2].output
                raise err
    assert info.value is err
    assert after == []  # the barrier never completed
    clean()


def test_a_party_raises_before_its_first_request_while_another_waits_at_the_barrier(
    model, x, err, clean
):
    after: list[int] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(x):
                bar()
                after.append(0)
            with tr.invoke(x):
                raise err
    assert info.value is err
    assert after == []
    clean()


def test_the_first_released_party_raises_at_once(model, x, err, clean):
    """Both arrive; the barrier releases them in definition order; invoke 0 raises as soon as
    it is released, so invoke 1 never runs on."""
    after: list[int] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(x):
                a = model.layers[0].output
                bar()
                raise err
            with tr.invoke(x):
                b = model.layers[1].output
                bar()
                after.append(1)
                c = model.layers[3].output
    assert info.value is err
    assert after == []
    clean()


# == after a body ended (END) while others still run =========================================


def test_raise_after_another_body_ended(model, net, x, err, clean):
    """Invoke 0 ends normally, having bound names; invoke 1 raises later: the trace fails with
    invoke 1's exception, and invoke 0's names are still written back."""
    (expected,) = outputs_of(net, torch.cat([x, x]), net.layers[0])
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                first = model.layers[0].output.clone()
            with tr.invoke(x):
                second = model.layers[2].output
                raise err
    assert info.value is err
    assert torch.equal(first, expected[:3])
    clean()


def test_raise_after_a_body_ended_with_a_pending_swap(model, net, x, err, clean):
    """Invoke 0 set a swap at layer 3 and ended; invoke 1 raises at layer 1, before it: the swap
    is dropped and the model is untouched."""
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[3].output = torch.full((3, 8), 7.0)
            with tr.invoke(x):
                b = model.layers[1].output
                raise err
    assert info.value is err
    clean()


def test_swap_of_an_ended_body_fails_while_another_body_waits(model, x, clean):
    resumed: list[str] = []
    with pytest.raises(ShapeError, match=r"layers\.2\.output"):
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[2].output = torch.zeros(4, 8)
            with tr.invoke(x):
                b = model.layers[3].output
                resumed.append("invoke 1")
    assert resumed == []
    clean()


# == inside the model's forward ==============================================================


class Cell(nn.Module):
    """A recurrent cell, called three times per forward; raises `error` at its call `fail_at`."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.fail_at: int | None = None
        self.error: BaseException | None = None
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        call = self.calls
        self.calls += 1
        if call == self.fail_at:
            assert self.error is not None
            raise self.error
        return torch.tanh(self.linear(h))


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.cell = Cell()
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cell.calls = 0
        h = self.encoder(x)
        for _ in range(3):
            h = self.cell(h)
        return self.head(h)


@pytest.fixture
def recurrent() -> Recurrent:
    torch.manual_seed(22)
    return Recurrent()


@pytest.mark.parametrize("k", [0, 1, 2])
def test_module_raises_at_call_k(recurrent, x, err, k):
    """The cell raises at call k. One invoke reads the cell's input then output at every step:
    it gets the plain values up to call k's input, never call k's output. Another waits for
    the head. A third ended before the failure. The trace ends with the model's exception."""
    with torch.no_grad():
        reference = recurrent(x)
    batch = torch.cat([x, x, x])  # the oracle runs the same batch: bit-exact values
    encoded, *oracle_out = outputs_of(recurrent, batch, recurrent.encoder, recurrent.cell)
    oracle_in = [encoded, *oracle_out[:2]]
    mine = slice(3, 6)  # invoke 1's rows
    model = mediator.Model(recurrent)
    recurrent.cell.fail_at, recurrent.cell.error = k, err
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    reached: list[str] = []
    try:
        with pytest.raises(Boom) as info:
            with model.trace() as tr:
                with tr.invoke(x):
                    enc = model.encoder.output.clone()
                with tr.invoke(x):
                    for step in tr.iter[0:3]:
                        inputs.append(model.cell.input.clone())
                        outputs.append(model.cell.output.clone())
                with tr.invoke(x):
                    head = model.head.output
                    reached.append("head")
    finally:
        recurrent.cell.fail_at = recurrent.cell.error = None
    assert info.value is err
    assert len(inputs) == k + 1 and len(outputs) == k
    for step in range(k + 1):
        assert torch.equal(inputs[step], oracle_in[step][mine])
    for step in range(k):
        assert torch.equal(outputs[step], oracle_out[step][mine])
    assert reached == []
    assert torch.equal(enc, encoded[:3])  # invoke 0 ended before the fault: names written back
    assert_clean(recurrent, x, reference, 0)
    retrace(model, recurrent, x)


def test_module_raises_where_no_body_watches_after_every_body_ended(recurrent, x, err):
    with torch.no_grad():
        reference = recurrent(x)
    model = mediator.Model(recurrent)
    recurrent.cell.fail_at, recurrent.cell.error = 2, err
    try:
        with pytest.raises(Boom) as info:
            with model.trace(x):
                h = model.cell.output.clone()  # call 0; the body then ends
    finally:
        recurrent.cell.fail_at = recurrent.cell.error = None
    assert info.value is err
    assert h.shape == (3, 8)
    assert_clean(recurrent, x, reference, 0)


def test_module_raises_while_a_function_body_waits(recurrent, x, err):
    with torch.no_grad():
        reference = recurrent(x)
    model = mediator.Model(recurrent)
    recurrent.cell.fail_at, recurrent.cell.error = 1, err

    def reads_head() -> torch.Tensor:
        return model.head.output

    try:
        with pytest.raises(Boom) as info:
            with model.trace() as tr:
                future = tr.invoke(x).run(reads_head)
    finally:
        recurrent.cell.fail_at = recurrent.cell.error = None
    assert info.value is err
    assert future.exception(timeout=0) is err
    assert_clean(recurrent, x, reference, 0)


# == inside generate =========================================================================


class FailingLM(TinyLM):
    """TinyLM whose `generate` raises `error` right after the forward of step `fail_after`."""

    fail_after = 1
    error: BaseException | None = None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 8,
    ) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for step in range(max_new_tokens):
            logits = self(input_ids, attention_mask=attention_mask)
            if step == self.fail_after and self.error is not None:
                raise self.error
            token = logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        return input_ids


@pytest.fixture
def failing_lm() -> Iterator[FailingLM]:
    torch.manual_seed(23)
    net = FailingLM(TinyLMConfig()).eval()
    yield net
    assert patched_forwards(net) == [] and hook_count(net) == 0


def _lm_head_oracle(net: FailingLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """lm_head outputs of steps 0 and 1 in a plain generate (the fault switched off)."""
    seen: list[torch.Tensor] = []
    handle = net.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    try:
        net.generate(ids, max_new_tokens=4)
    finally:
        handle.remove()
    return seen[:2]


GENERATE_BODIES = ["open-loop", "bounded-step-3", "tr.result", "function"]


@pytest.mark.parametrize("body", GENERATE_BODIES)
def test_generate_raises_after_step_1(failing_lm, err, body):
    torch.manual_seed(24)
    ids = torch.randint(1, 64, (2, 5))
    oracle = _lm_head_oracle(failing_lm, ids)
    with torch.no_grad():
        reference = failing_lm(ids)
    model = mediator.Model(failing_lm)
    failing_lm.error = err
    logits: list[torch.Tensor] = []
    after: list[str] = []
    try:
        with pytest.raises(Boom) as info:
            if body == "open-loop":
                with model.generate(ids, max_new_tokens=4) as tr:
                    for step in tr.iter[:]:
                        logits.append(model.lm_head.output.clone())
                    after.append("after the loop")
            elif body == "bounded-step-3":
                with model.generate(ids, max_new_tokens=4) as tr:
                    logits.append(model.lm_head.output.clone())
                    for step in tr.iter[3]:
                        late = model.lm_head.output
                    after.append("after step 3")
            elif body == "tr.result":
                with model.generate(ids, max_new_tokens=4) as tr:
                    logits.append(model.lm_head.output.clone())
                    tokens = tr.result
                    after.append("after tr.result")
            else:

                def steps(tr: mediator.Tracer) -> None:
                    for step in tr.iter[:]:
                        logits.append(model.lm_head.output.clone())
                    after.append("after the loop")

                with model.generate(max_new_tokens=4) as tr:
                    future = tr.invoke(ids).run(steps, tr)
    finally:
        failing_lm.error = None
    assert info.value is err
    assert after == []
    expected = oracle if body in ("open-loop", "function") else oracle[:1]
    assert len(logits) == len(expected)
    for got, want in zip(logits, expected, strict=True):
        assert torch.equal(got, want)
    assert_clean(failing_lm, ids, reference, 0)
    assert torch.equal(
        failing_lm.generate(ids, max_new_tokens=4), TinyLM.generate(failing_lm, ids, None, 4)
    )


# == during batching =========================================================================


class FailingBatcher(mediator.Batcher):
    """A Batcher whose `method` raises `error` at its call number `at` (counting from 0)."""

    def __init__(self, method: str, error: BaseException, at: int = 0) -> None:
        self.method, self.error, self.at = method, error, at
        self.calls = 0

    def _count(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.calls - 1 == self.at:
                raise self.error

    def batch(self, inputs: Any, generate: bool = False) -> Any:
        self._count("batch")
        return super().batch(inputs, generate)

    def narrow(self, value: Any, rows: slice, total: int) -> Any:
        self._count("narrow")
        return super().narrow(value, rows, total)

    def merge(self, full: Any, views: Any, total: int) -> Any:
        self._count("merge")
        return super().merge(full, views, total)


def test_batch_raises_single_invoke(net, x, err, clean):
    model = mediator.Model(net, batcher=FailingBatcher("batch", err))
    ran: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace(x):
            ran.append("body")
            h = model.layers[0].output
    assert info.value is err
    assert ran == []
    clean()


def test_batch_raises_with_several_invokes(net, x, err, clean):
    model = mediator.Model(net, batcher=FailingBatcher("batch", err))
    ran: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                ran.append("invoke 0")
            with tr.invoke(x[:1]):
                ran.append("invoke 1")
    assert info.value is err
    assert ran == []
    clean()


def test_batch_raises_and_every_future_is_resolved(net, x, err):
    model = mediator.Model(net, batcher=FailingBatcher("batch", err))
    with pytest.raises(Boom):
        with model.trace() as tr:
            first = tr.invoke(x).run(lambda: model.layers[0].output)
            second = tr.invoke(x[:1]).run(lambda: model.output)
    assert first.done() and second.done()
    assert first.exception(timeout=0) is err


@pytest.mark.parametrize("at", [0, 1, 2])
def test_narrow_raises(net, x, err, clean, at):
    """The k-th narrowing of a value to an invoke's rows raises (on the model thread when a
    waiting body is served, on the body's thread when it reads the current boundary)."""
    model = mediator.Model(net, batcher=FailingBatcher("narrow", err, at))
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.layers[1].output
                a2 = model.layers[2].output
            with tr.invoke(x[:2]):
                b = model.layers[1].output
                b2 = model.layers[2].output
    assert info.value is err
    clean()


def test_narrow_raises_on_the_body_thread(net, x, err, clean):
    """Invoke 0 is released from a barrier while the model stands at layer 1's output and reads
    it there itself: its view is cut on its own thread, and that narrowing raises."""
    model = mediator.Model(net, batcher=FailingBatcher("narrow", err, at=1))
    after: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(x):
                bar()
                a = model.layers[1].output  # narrowing 1, on this body's thread
                after.append("invoke 0")
            with tr.invoke(x[:2]):
                b = model.layers[1].output  # narrowing 0, on the model thread
                bar()
                after.append("invoke 1")
    assert info.value is err
    assert after == []
    clean()


def test_merge_raises(net, x, err, clean):
    model = mediator.Model(net, batcher=FailingBatcher("merge", err))
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                model.layers[1].output = model.layers[1].output * 2
            with tr.invoke(x[:2]):
                b = model.output
    assert info.value is err
    clean()


def test_shape_error_from_batching_is_raised_as_is(model, x, clean):
    with pytest.raises(ShapeError, match="invoke 1"):
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.output
            with tr.invoke(torch.randn(2, 3)):
                b = model.output
    clean()


# == in a cache ==============================================================================


@pytest.mark.parametrize("where", ["trace-block", "invoke-body"])
@pytest.mark.parametrize("at", [0, 3])
def test_cache_record_raises(monkeypatch, model, x, err, clean, where, at):
    """Recording into a cache raises (no public way to make it: `Cache.record` is patched)."""
    record = Cache.record
    calls = [0]

    def failing_record(self: Cache, site: int, output: bool, value: Any) -> None:
        calls[0] += 1
        if calls[0] - 1 == at:
            raise err
        record(self, site, output, value)

    monkeypatch.setattr(Cache, "record", failing_record)
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            if where == "trace-block":
                cache = tr.cache(inputs=True)
            with tr.invoke(x):
                if where == "invoke-body":
                    mine = tr.cache(inputs=True)
                h = model.layers[3].output
    assert info.value is err
    monkeypatch.undo()
    clean()


def test_cache_lookup_of_an_entry_not_recorded_yet_raises_in_the_body(model, x, clean):
    with pytest.raises(KeyError, match="layers.3"):
        with model.trace(x) as tr:
            cache = tr.cache()
            h = model.layers[1].output
            early = cache["layers.3"]
    clean()


def test_cache_of_an_unknown_module_inside_a_body(model, x, clean):
    after: list[str] = []
    with pytest.raises(UsageError, match="layers.1"):
        with model.trace() as tr:
            with tr.invoke(x):
                h = model.layers[0].output
                cache = tr.cache(modules=["layer.1"])
                after.append("after")
            with tr.invoke(x):
                late = model.layers[3].output
                after.append("invoke 1")
    assert after == []
    clean()


# == while waiting on tr.result ==============================================================


def test_model_raises_while_a_body_waits_on_the_result(recurrent, x, err):
    with torch.no_grad():
        reference = recurrent(x)
    model = mediator.Model(recurrent)
    recurrent.cell.fail_at, recurrent.cell.error = 2, err
    after: list[str] = []
    try:
        with pytest.raises(Boom) as info:
            with model.trace(x) as tr:
                h = model.encoder.output
                result = tr.result
                after.append("result")
    finally:
        recurrent.cell.fail_at = recurrent.cell.error = None
    assert info.value is err
    assert after == []
    assert_clean(recurrent, x, reference, 0)


def test_another_body_raises_while_one_waits_on_the_result(model, x, err, clean):
    after: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                result = tr.result
                after.append("result")
            with tr.invoke(x):
                b = model.layers[2].output
                raise err
    assert info.value is err
    assert after == []
    clean()


def test_raise_right_after_the_result_while_another_waits_on_it(model, net, x, err, clean):
    """After the forward: invoke 0 gets tr.result and raises at once; invoke 1, waiting on the
    result too (answered after invoke 0), is cancelled."""
    got: list[torch.Tensor] = []
    after: list[str] = []
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                got.append(tr.result)
                raise err
            with tr.invoke(x[:2]):
                other = tr.result
                after.append("invoke 1")
    assert info.value is err
    assert after == []
    with torch.no_grad():
        assert torch.equal(got[0], net(torch.cat([x, x[:2]]))[:3])
    clean()


def test_function_raises_after_the_result(model, x, err, clean):
    def reads_then_fails(tr: mediator.Tracer) -> None:
        tr.result
        raise err

    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(reads_then_fails, tr)
    assert info.value is err
    assert future.exception(timeout=0) is err
    clean()


# == Ctrl-C: a real SIGINT to the main thread ================================================


class CtrlC:
    """Sends SIGINT to the main thread (`signal.pthread_kill`) from a helper thread once `go`
    is set, and measures how long the trace takes to raise KeyboardInterrupt.

    A signal that lands between the main thread's releasing the GIL and its blocking in a lock
    does not interrupt that wait (a CPython race, not the library's): it happened here when the
    helper, woken by the main thread, preempted it on the same CPU. So the helper first moves off
    the main thread's CPU. `left` (optional) is an Event set once the main thread has left the
    blocking call it was in; if it is not set within 2 s the signal was lost in that window and
    is sent once more (`sent` records every send; the time is measured from the last, and the
    report prints how many were sent). `safety` is set if the trace has not ended 5 s after the
    signal, so a body that is never stopped ends by itself instead of hanging the test run.
    """

    def __init__(self, go: threading.Event, left: threading.Event | None = None) -> None:
        self.go, self.left = go, left
        self.ended = threading.Event()
        self.safety = threading.Event()
        self.sent: list[float] = []
        self.thread = threading.Thread(target=self._run, name="ctrl-c-helper", daemon=True)

    def _send(self) -> None:
        self.sent.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _run(self) -> None:
        if not self.go.wait(10):
            return
        _off_the_main_threads_cpu()
        self._send()
        if self.left is not None and not self.left.wait(2) and not self.ended.is_set():
            self._send()
        if not self.ended.wait(5):
            self.safety.set()

    def run(self, trace: Callable[[], None]) -> tuple[bool, float | None]:
        """Run `trace()`; returns (KeyboardInterrupt came from it, seconds from the effective
        signal to the exception)."""
        raised, seconds = False, None
        try:
            self.thread.start()
            try:
                trace()
            except KeyboardInterrupt:
                raised, seconds = True, time.monotonic() - self.sent[-1]
            finally:
                self.ended.set()
            self.thread.join(10)
        except KeyboardInterrupt:  # arrived after the with: must not abort the test run
            raised = False
        assert self.sent, "the signal was never sent"
        return raised, seconds


def _off_the_main_threads_cpu() -> None:
    """Move the calling helper thread off the CPUs the main thread may run on (it is pinned
    while a trace runs), so that the helper does not preempt the main thread in the moment
    between its releasing the GIL and blocking, where a signal cannot interrupt the wait."""
    if not hasattr(os, "sched_getaffinity"):
        return
    main = threading.main_thread().native_id
    others = os.sched_getaffinity(0) - os.sched_getaffinity(main)
    if others:
        os.sched_setaffinity(0, others)


def _wait_until_no_worker_is_busy(timeout: float = 5.0) -> None:
    """Block until every mediator worker is back in the pool (each return wakes us); used to
    clean up after a failure that left a worker running. Watches `POOL._idle` (no public way)."""
    pool = _workers.POOL
    returned = threading.Event()

    class Watched(list):  # type: ignore[type-arg]
        def append(self, item: Any) -> None:
            super().append(item)
            returned.set()

    with pool._lock:
        pool._idle = Watched(pool._idle)
    try:
        deadline = time.monotonic() + timeout
        while busy_workers():
            if not returned.wait(max(0.0, deadline - time.monotonic())):
                break
            returned.clear()
    finally:
        with pool._lock:
            pool._idle = list(pool._idle)


class Slow(nn.Module):
    """Tells the test it runs, then blocks until released (or interrupted)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.running = threading.Event()
        self.release = threading.Event()
        self.left = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running.set()
        try:
            self.release.wait(10)
        finally:
            self.left.set()
        return self.linear(x)


class SlowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.slow = Slow()
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.slow(self.first(x)))


def _report(what: str, seconds: float | None, sends: int) -> None:
    shown = f"{seconds * 1000:.2f} ms" if seconds is not None else "never"
    print(f"\nCtrl-C (pthread_kill SIGINT) {what}: KeyboardInterrupt after {shown} ({sends} sent)")


def test_ctrl_c_while_the_model_runs_and_bodies_wait(sigint_ready, x):
    """SIGINT while the model thread is inside a module; invoke 0 waits at a barrier, invoke 1
    for a later value, invoke 2 (a function) on tr.result."""
    torch.manual_seed(25)
    net = SlowNet()
    net.slow.release.set()
    with torch.no_grad():
        reference = net(x)
    net.slow.release.clear()
    net.slow.running.clear()
    net.slow.left.clear()
    model = mediator.Model(net)
    after: list[str] = []

    def waits_for_result(tr: mediator.Tracer) -> None:
        tr.result
        after.append("result")

    def trace() -> None:
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(x):
                a = model.first.output
                bar()
                after.append("barrier")
            with tr.invoke(x):
                b = model.last.output
                after.append("last")
                bar()
            future = tr.invoke(x).run(waits_for_result, tr)

    ctrl_c = CtrlC(net.slow.running, net.slow.left)
    try:
        raised, seconds = ctrl_c.run(trace)
    finally:
        net.slow.release.set()
    _report("while the model runs", seconds, len(ctrl_c.sent))
    assert raised, "KeyboardInterrupt did not come from the with"
    assert seconds is not None and seconds < 1.0
    assert after == []
    assert busy_workers() == []
    assert patched_forwards(net) == []
    with torch.no_grad():
        assert torch.equal(net(x), reference)
    retrace(model, net, x)


def _busy_trace(model: mediator.Model, x: torch.Tensor, case: str, flags: dict[str, Any]):
    """A trace in which one body is busy in its own code (no request) when SIGINT comes.

    `flags`: `busy` (set when the loop starts), `stop` (ends the loop: the safety valve),
    `stopped` (set when the busy body left its loop), `after` (code after the fault)."""
    busy, stop, stopped, after = flags["busy"], flags["stop"], flags["stopped"], flags["after"]

    def spin() -> None:
        busy.set()
        try:
            while not stop.is_set():
                pass
        finally:
            stopped.set()

    def busy_function() -> None:
        model.layers[1].output
        spin()
        model.output
        after.append("busy body")

    def trace() -> None:
        if case == "single-function":
            with model.trace() as tr:
                tr.invoke(x).run(busy_function)
        elif case == "busy-first-other-at-barrier":
            with model.trace() as tr:
                bar = tr.barrier(2)
                with tr.invoke(x):
                    h = model.layers[1].output
                    spin()
                    bar()
                    after.append("busy body")
                with tr.invoke(x):
                    g = model.layers[0].output
                    bar()
                    after.append("barrier")
        elif case == "busy-second-first-at-barrier":
            with model.trace() as tr:
                bar = tr.barrier(2)
                with tr.invoke(x):
                    g = model.layers[0].output
                    bar()
                    after.append("barrier")
                with tr.invoke(x):
                    h = model.layers[1].output
                    spin()
                    bar()
                    after.append("busy body")
        elif case == "busy-second-first-waits-for-a-value":
            with model.trace() as tr:
                with tr.invoke(x):
                    late = model.layers[3].output
                    after.append("waiting body")
                with tr.invoke(x):
                    h = model.layers[1].output
                    spin()
                    model.output
                    after.append("busy body")
        else:
            raise AssertionError(case)

    return trace


def _ctrl_c_while_busy(net: MLP, model: mediator.Model, x: torch.Tensor, case: str) -> None:
    with torch.no_grad():
        reference = net(x)
    flags: dict[str, Any] = {
        "busy": threading.Event(),
        "stopped": threading.Event(),
        "after": [],
    }
    ctrl_c = CtrlC(flags["busy"])
    flags["stop"] = ctrl_c.safety
    try:
        raised, seconds = ctrl_c.run(_busy_trace(model, x, case, flags))
        _report(f"while the main thread waits for a busy body ({case})", seconds, len(ctrl_c.sent))
        assert raised, "KeyboardInterrupt did not come from the with"
        assert seconds is not None and seconds < 1.0
        assert not ctrl_c.safety.is_set(), "the busy body had to be stopped by the test"
        assert flags["stopped"].wait(1), "the busy body was never stopped"
        assert flags["after"] == []
        assert busy_workers() == []
    finally:
        ctrl_c.safety.set()  # a body left running must not spin forever
        flags["stopped"].wait(5)
        _wait_until_no_worker_is_busy()
    assert patched_forwards(net) == []
    with torch.no_grad():
        assert torch.equal(net(x), reference)
    retrace(model, net, x)


@pytest.mark.parametrize("case", ["single-function", "busy-first-other-at-barrier"])
def test_ctrl_c_while_a_body_is_busy(sigint_ready, net, model, x, case):
    _ctrl_c_while_busy(net, model, x, case)


@pytest.mark.parametrize(
    "case", ["busy-second-first-at-barrier", "busy-second-first-waits-for-a-value"]
)
def test_ctrl_c_while_a_later_body_is_busy(sigint_ready, net, model, x, case):
    _ctrl_c_while_busy(net, model, x, case)
