"""A body computes under its caller's torch thread state, and what it changes ends with it.

Bodies run on reused worker threads, where torch keeps its state per thread. Each test compares
what a body sees or computes with what the same lines compute in plain PyTorch on the caller's
thread; the "ends with the body" tests run a second trace and check that its body, on the same
worker thread, starts from its own caller's state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

import mediator

Ending = Callable[[mediator.Model, torch.Tensor, Callable[[], None]], None]


def _returns(model: mediator.Model, x: torch.Tensor, change: Callable[[], None]) -> None:
    with model.trace(x):
        _ = model.layers[0].output
        change()


def _raises(model: mediator.Model, x: torch.Tensor, change: Callable[[], None]) -> None:
    with pytest.raises(ZeroDivisionError):
        with model.trace(x):
            _ = model.layers[0].output
            change()
            _ = 1 / 0


def _cancelled(model: mediator.Model, x: torch.Tensor, change: Callable[[], None]) -> None:
    """The body changes the state and waits; another invoke fails: the trace cancels it."""
    with pytest.raises(ZeroDivisionError):
        with model.trace() as tr:
            with tr.invoke(x):
                _ = model.layers[0].output
                change()
                _ = model.layers[3].output
            with tr.invoke(x):
                _ = model.layers[1].output
                _ = 1 / 0


ENDINGS = {"returns": _returns, "raises": _raises, "cancelled": _cancelled}


def _body_sees(model: mediator.Model, x: torch.Tensor, look: Callable[[], Any]) -> tuple[Any, Any]:
    """What `look()` returns in a body, and the thread that body ran on."""
    seen: dict[str, Any] = {}
    with model.trace(x):
        _ = model.layers[0].output
        seen["value"] = look()
        seen["thread"] = threading.current_thread()
    return seen["value"], seen["thread"]


def _changed_then_fresh(
    model: mediator.Model,
    x: torch.Tensor,
    ending: str,
    change: Callable[[], None],
    look: Callable[[], Any],
) -> Any:
    """Run a body that calls `change()` and ends as `ending`; then what `look()` returns in the
    next trace's body, which must run on the same worker thread."""
    threads: list[threading.Thread] = []

    def change_here() -> None:
        threads.append(threading.current_thread())
        change()

    ENDINGS[ending](model, x, change_here)
    value, thread = _body_sees(model, x, look)
    assert thread is threads[0], "the second trace ran on another thread: nothing was tested"
    return value


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_body_turning_grad_off_does_not_reach_the_next_trace(model, x, ending):
    layer = model.layers[1]._module
    reference = layer(x).requires_grad  # plain PyTorch on the caller's thread: True
    assert reference

    def look() -> tuple[bool, bool]:
        return torch.is_grad_enabled(), layer(x).requires_grad

    assert _changed_then_fresh(model, x, ending, lambda: torch.set_grad_enabled(False), look) == (
        True,
        reference,
    )


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_body_turning_autocast_on_does_not_reach_the_next_trace(model, x, ending):
    layer = model.layers[1]._module
    reference = layer(x).dtype  # float32

    def change() -> None:
        torch.set_autocast_dtype("cpu", torch.float16)
        torch.set_autocast_enabled("cpu", True)
        torch.set_autocast_cache_enabled(False)

    def look() -> tuple[bool, torch.dtype, torch.dtype, bool]:
        return (
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            layer(x).dtype,
            torch.is_autocast_cache_enabled(),
        )

    fresh = _changed_then_fresh(model, x, ending, change, look)
    assert fresh == (False, torch.get_autocast_dtype("cpu"), reference, True)


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_body_setting_a_default_device_does_not_reach_the_next_trace(model, x, ending):
    current = torch.utils._device.CURRENT_DEVICE

    def look() -> tuple[str, str]:
        return torch.zeros(1).device.type, str(torch.get_default_device())

    fresh = _changed_then_fresh(model, x, ending, lambda: torch.set_default_device("meta"), look)
    assert fresh == (torch.zeros(1).device.type, str(torch.get_default_device())) == ("cpu",) * 2
    assert torch.utils._device.CURRENT_DEVICE == current  # torch's own record, for torch.compile


@pytest.mark.parametrize("ending", ENDINGS)
def test_saved_tensor_hooks_a_body_pushed_do_not_reach_the_next_trace(model, x, ending):
    packed: list[torch.Tensor] = []

    def change() -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(
            lambda t: packed.append(t) or t, lambda t: t
        )
        hooks.__enter__()  # never left: a plain push

    def look() -> int:
        packed.clear()
        w = torch.ones(3, requires_grad=True)
        (w * w).sum()
        return len(packed)

    assert _changed_then_fresh(model, x, ending, change, look) == 0


def test_a_body_keeping_an_inference_guard_alive_does_not_reach_the_next_trace(model, x):
    guards: list[Any] = []

    def change() -> None:
        guards.append(torch.autograd.grad_mode._enter_inference_mode(True))

    _returns(model, x, change)
    (inference, grad), _ = _body_sees(
        model, x, lambda: (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
    )
    assert (inference, grad) == (False, True)
    guards.clear()


def test_a_body_calling_set_num_threads_does_not_keep_a_thread_team(model, x):
    threads = torch.get_num_threads()
    try:
        fresh = _changed_then_fresh(
            model, x, "returns", lambda: torch.set_num_threads(2), torch.get_num_threads
        )
    finally:
        torch.set_num_threads(threads)
    assert fresh == 1  # a worker computes with one intra-op thread (see _affinity.py)


# -- the caller's state is the body's -----------------------------------------------------------


def test_a_body_runs_under_the_callers_autocast(model, x):
    layer = model.layers[1]._module
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = layer(x)
        seen, _ = _body_sees(model, x, lambda: layer(x))
    assert seen.dtype == torch.bfloat16
    assert torch.equal(seen, reference)


@pytest.mark.parametrize("how", ["context", "set_default_device"])
def test_a_body_runs_under_the_callers_default_device(model, x, how):
    if how == "context":
        with torch.device("meta"):
            reference = torch.zeros(2).device
            seen, _ = _body_sees(model, x, lambda: torch.zeros(2).device)
    else:
        torch.set_default_device("meta")
        try:
            reference = torch.zeros(2).device
            seen, _ = _body_sees(model, x, lambda: torch.zeros(2).device)
        finally:
            torch.set_default_device(None)
    assert seen == reference == torch.device("meta")
    after, _ = _body_sees(model, x, lambda: torch.zeros(2).device)
    assert after == torch.device("cpu")


def test_a_body_runs_under_the_callers_saved_tensor_hooks(model, x):
    packed: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t.shape)
        return t

    def compute() -> int:
        before = len(packed)  # the forward saves tensors under the hooks too
        w = torch.ones(3, requires_grad=True)
        (w * w.exp()).sum()
        return len(packed) - before

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference = compute()
        seen, _ = _body_sees(model, x, compute)
    assert seen == reference > 0


def test_a_body_runs_under_the_callers_inference_mode_and_no_grad(model, x):
    def look() -> tuple[bool, bool, bool]:
        out = model.layers[1]._module(x)
        return torch.is_inference_mode_enabled(), out.is_inference(), out.requires_grad

    with torch.inference_mode():
        seen, _ = _body_sees(model, x, look)
    assert seen == (True, True, False)
    with torch.no_grad():
        seen, _ = _body_sees(model, x, look)
    assert seen == (False, False, False)
    seen, _ = _body_sees(model, x, look)
    assert seen == (False, False, True)
