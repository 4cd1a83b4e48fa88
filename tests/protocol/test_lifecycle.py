"""The lifecycle of a trace under failure: every step of the library's own machinery may fail
(starting a worker, entering the caller's torch state, building a body, pinning, detaching), and
the trace must then end with that error: no hang, no dead worker, no tap left, every future
resolved, the tracer closed, and still at most one body running user code at any moment.

Each test injects the failure into the library's own step (not through the public API) and
compares what the model computes afterwards with a plain forward pass.
"""

# ruff: noqa: B018, F841

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import MLP, busy_workers, hook_count, patched_forwards
from torch import nn

import mediator
from mediator import _mediator, _run, _workers
from mediator._protocol import MediatorState, TraceState
from mediator._torchstate import TorchState


class Boom(Exception):
    """The injected fault."""


@pytest.fixture
def clean(net: MLP, model: mediator.Model, x: torch.Tensor) -> Callable[[], None]:
    """`clean()`: nothing of a failed trace is left, and the model traces and computes as
    before (oracle: a plain forward pass)."""
    with torch.no_grad():
        reference = net(x)
    hooks = hook_count(net)

    def check() -> None:
        assert busy_workers() == []
        assert patched_forwards(net) == []
        assert hook_count(net) == hooks
        with torch.no_grad():
            assert torch.equal(net(x), reference)
        with model.trace(x):
            out = model.output
        assert torch.equal(out.detach(), reference)

    return check


def fail_on_call(k: int, error: BaseException, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, except that call number `k` (from 0) raises `error`."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] - 1 == k:
            raise error
        return real(*args, **kwargs)

    return wrapper


# -- case 1: a worker that cannot be started -------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_worker_that_cannot_start_fails_the_trace(monkeypatch, model, x, clean, k):
    """The k-th of three workers cannot be started (the first is launched by the model thread,
    the later ones along the plan by the mediator before them): the trace raises that error,
    and every future is resolved."""
    error = RuntimeError("can't start new thread")
    monkeypatch.setattr(_workers, "submit", fail_on_call(k, error, _workers.submit))
    with pytest.raises(RuntimeError) as info:
        with model.trace() as tr:
            futures = [
                tr.invoke(x[i : i + 1]).run(lambda i=i: model.layers[i].output) for i in range(3)
            ]
    assert info.value is error
    assert all(f.done() for f in futures)
    assert futures[k].exception() is error
    assert tr._state is TraceState.CLOSED
    monkeypatch.undo()
    clean()


def test_pinning_the_model_thread_fails(monkeypatch, model, x, clean):
    """The trace cannot pin its own thread: it raises before anything else was taken."""
    error = OSError(1, "Operation not permitted")

    def refuse() -> None:
        raise error

    monkeypatch.setattr(_run, "trace_cpu", refuse)
    with pytest.raises(OSError) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(lambda: model.output)
    assert info.value is error
    assert future.exception() is error
    monkeypatch.undo()
    clean()


# -- case 2: the library fails while a body starts ---------------------------------------------


@pytest.mark.parametrize("k", [0, 1])
def test_entering_the_callers_torch_state_fails(monkeypatch, model, x, clean, k):
    """Entering the captured torch state on the worker fails for the k-th body: an error, and
    the worker goes back to the pool (it is not dead)."""
    error = Boom("state")
    monkeypatch.setattr(TorchState, "enter", fail_on_call(k, error, TorchState.enter))
    workers_before = threading.active_count()
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            with tr.invoke(x[:1]):
                a = model.layers[0].output
            with tr.invoke(x[1:]):
                b = model.layers[1].output
    assert info.value is error
    assert threading.active_count() <= workers_before + 2
    monkeypatch.undo()
    clean()


def test_detaching_the_taps_fails(monkeypatch, model, net, x):
    """A failing release step does not skip the others: the futures are resolved (the body
    finished: its result is kept), the caller's CPU mask is back, and the error is raised."""
    error = Boom("detach")
    real_detach = _run.detach

    def detach_then_fail(attached: Any) -> None:
        real_detach(attached)
        raise error

    monkeypatch.setattr(_run, "detach", detach_then_fail)
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(lambda: model.layers[0].output)
    assert info.value is error
    with torch.no_grad():
        assert torch.equal(future.result(), net.layers[0](x))
    if mask is not None:
        assert os.sched_getaffinity(0) == mask
    assert busy_workers() == [] and patched_forwards(net) == []


# -- case 4: building the bodies fails ---------------------------------------------------------


def test_a_body_that_cannot_be_compiled_resolves_every_future(monkeypatch, model, x, clean):
    """Compiling a with-body fails while the trace builds its mediators: the function invoke
    defined before it gets the error too, and the tracer is closed, not left running."""
    error = SyntaxError("injected")
    monkeypatch.setattr(_run, "make_body", fail_on_call(0, error, _run.make_body))
    with pytest.raises(SyntaxError) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(lambda: model.output)
            with tr.invoke(x):
                h = model.layers[0].output
    assert info.value is error
    assert future.done() and future.exception() is error
    assert tr._state is TraceState.CLOSED
    assert tr.result is None
    monkeypatch.undo()
    clean()


def test_the_trace_block_raises_before_running(model, x, clean):
    """The trace's own block raises: the trace never runs, and a future of it says so instead
    of blocking forever."""
    with pytest.raises(Boom) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(lambda: model.output)
            raise Boom("block")
    assert future.done()
    assert future.exception() is info.value
    clean()


# -- case 3: after Ctrl-C, still one body at a time ---------------------------------------------


class _Exclusive:
    """Records whether two bodies ever ran user code at the same moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: list[str] = []
        self.overlaps: list[list[str]] = []

    def enter(self, name: str) -> None:
        with self.lock:
            self.active.append(name)
            if len(self.active) > 1:
                self.overlaps.append(list(self.active))

    def leave(self, name: str) -> None:
        with self.lock:
            self.active.remove(name)


class _CtrlC:
    """Sends SIGINT to the main thread once `go` is set, from a thread kept off the main
    thread's CPU; a signal that lands in CPython's window between releasing the GIL and
    blocking is lost, so it is sent again every half second (at most 10 times) until `done`."""

    def __init__(self, go: threading.Event) -> None:
        self.go = go
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)
        self.thread.start()

    def _send(self) -> None:
        if not self.go.wait(10):
            return
        if hasattr(os, "sched_setaffinity"):
            others = os.sched_getaffinity(0) - os.sched_getaffinity(
                threading.main_thread().native_id
            )
            if others:
                os.sched_setaffinity(0, others)
        for _ in range(10):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            if self.done.wait(0.5):
                return

    def stop(self) -> None:
        """Stop sending. A resend already under way when the trace raised (under load, after
        the half second) can still arrive here: it is absorbed, since it is no longer part of
        what the test checks; the sender sends at most one more once `done` is set."""
        self.done.set()
        while True:
            try:
                self.thread.join(10)
                _pending_signal_check()
                return
            except KeyboardInterrupt:
                continue


def _pending_signal_check() -> None:
    """Does nothing; calling it runs the interpreter's check for a pending signal."""


@pytest.mark.parametrize("busy", [0, 1])
def test_after_ctrl_c_only_one_body_runs_user_code(sigint_ready, model, x, busy):
    """One invoke is busy in its own code, the other blocked at a request, when Ctrl-C comes:
    the busy one is stopped first, and only then is the blocked one resumed (its `finally` runs
    user code). Never two at once."""
    exclusive = _Exclusive()
    started = threading.Event()
    release = threading.Event()

    def busy_body() -> None:
        model.layers[0].output
        exclusive.enter("busy")
        try:
            started.set()
            while not release.is_set():  # Python code: an interrupt lands here
                pass
        finally:
            time.sleep(0.05)
            exclusive.leave("busy")

    def blocked_body() -> None:
        model.layers[0].output
        try:
            model.layers[3].output  # blocks: the model never gets there before the Ctrl-C
        finally:
            exclusive.enter("blocked")
            time.sleep(0.05)
            exclusive.leave("blocked")

    bodies = [busy_body, blocked_body] if busy == 0 else [blocked_body, busy_body]
    sender = _CtrlC(started)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with model.trace() as tr:
                for body in bodies:
                    tr.invoke(x).run(body)
    finally:
        sender.stop()
        release.set()
    assert time.monotonic() - start < 5
    assert exclusive.overlaps == []
    assert busy_workers() == []


def test_ctrl_c_while_a_body_is_stuck_in_c_code(sigint_ready, model, x):
    """A body blocked in C code (here `Event.wait`, which no asynchronous exception reaches)
    holds the baton when Ctrl-C comes: the trace raises within about a second anyway; the
    cancellation then travels with the baton: once the stuck body ends, the blocked one is
    resumed and ends too, never both at once, and both workers go back to the pool. A trace
    started meanwhile runs on other workers."""
    exclusive = _Exclusive()
    started, unstick, blocked_ended = threading.Event(), threading.Event(), threading.Event()

    def stuck() -> None:
        model.layers[0].output
        exclusive.enter("stuck")
        try:
            started.set()
            unstick.wait(10)  # C code: the interrupt waits until it returns
        finally:
            exclusive.leave("stuck")

    def blocked() -> None:
        try:
            model.layers[0].output
            model.layers[3].output
        finally:
            exclusive.enter("blocked")
            exclusive.leave("blocked")
            blocked_ended.set()

    sender = _CtrlC(started)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with model.trace() as tr:
                tr.invoke(x).run(stuck)
                tr.invoke(x).run(blocked)
    finally:
        sender.stop()
    assert time.monotonic() - start < 2.5
    assert not blocked_ended.is_set()  # it waits for its turn, behind the stuck one
    with model.trace(x):  # meanwhile the model traces normally
        out = model.output
    with torch.no_grad():
        assert torch.equal(out, model._module(x))
    unstick.set()
    assert blocked_ended.wait(10)
    deadline = time.monotonic() + 5
    while busy_workers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert busy_workers() == []
    assert exclusive.overlaps == []


def test_ctrl_c_while_the_model_runs_its_own_code(sigint_ready, x):
    """SIGINT while the model thread is inside a module's forward raises KeyboardInterrupt
    right there, as without the library (the module's own `finally` sees it)."""

    class Waits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inside = threading.Event()
            self.interrupted = False

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            self.inside.set()
            try:
                threading.Event().wait(5)
            except KeyboardInterrupt:
                self.interrupted = True
                raise
            return h

    net = nn.Sequential(nn.Linear(8, 8), Waits(), nn.Linear(8, 8))
    model = mediator.Model(net)
    sender = _CtrlC(net[1].inside)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            with model.trace(x):
                h = model[2].output
    finally:
        sender.stop()
    assert time.monotonic() - start < 2
    assert net[1].interrupted
    assert busy_workers() == [] and patched_forwards(net) == []


# -- case 5: a trace opened inside a trace, on the same thread ----------------------------------


def test_a_trace_opened_from_a_forward_hook_leaves_the_outer_one_intact(model, net, x):
    """A forward hook on layers.1 traces the same model on other inputs, while the outer trace
    runs. Both get what plain PyTorch computes, and the outer trace's later reads and edits
    (layers.2, layers.3) are still served after the inner one ended."""
    other = torch.randn(2, 8)
    inner: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if inner:
            return  # the inner trace's own call of layers.1
        with model.trace(other):
            inner["h0"] = model.layers[0].output
            inner["out"] = model.output

    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    handle = net.layers[1].register_forward_hook(hook)
    try:
        with model.trace(x):
            h2 = model.layers[2].output
            model.layers[3].output = model.layers[3].output * 0
            out = model.output
    finally:
        handle.remove()
    with torch.no_grad():
        h1 = torch.relu(net.layers[1](torch.relu(net.layers[0](x))))
        assert torch.equal(h2, net.layers[2](h1))
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(inner["h0"], net.layers[0](other))
        assert torch.equal(inner["out"], net(other))
    if mask is not None:
        assert os.sched_getaffinity(0) == mask
    assert busy_workers() == [] and patched_forwards(net) == []


# -- case 12: tr.stop() acts like return --------------------------------------------------------


def test_stop_ends_its_body_like_return(model, net, x):
    """Code after `tr.stop()` does not run; names bound before it are kept; the rest of the
    model does not run (oracle: call counts with forward hooks)."""
    calls: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
        for i, layer in enumerate(net.layers)
    ]
    after = "before the trace"
    try:
        with model.trace(x) as tr:
            h = model.layers[1].output
            tr.stop()
            after = "ran"
    finally:
        for handle in handles:
            handle.remove()
    assert after == "before the trace"
    assert calls == [0, 1]
    with torch.no_grad():
        assert torch.equal(h, net.layers[1](torch.relu(net.layers[0](x))))


# -- the protocol's states -----------------------------------------------------------------------


def test_mediator_states_follow_the_transitions(monkeypatch, model, x):
    """Every state change made through `enter_state` is one the protocol allows (it asserts
    so), and each mediator of a trace goes CREATED -> STARTING -> RUNNING -> ... -> DONE (the
    RUNNING <-> BLOCKED changes of each read are written out, with their own assertion)."""
    seen: list[tuple[int, MediatorState, MediatorState]] = []
    real = _mediator.Mediator.enter_state

    def record(self: Any, new: MediatorState) -> None:
        seen.append((self.index, self.state, new))
        real(self, new)

    monkeypatch.setattr(_mediator.Mediator, "enter_state", record)
    with model.trace() as tr:
        with tr.invoke(x[:1]):
            a = model.layers[1].output
        with tr.invoke(x[1:]):
            b = model.layers[2].output
    for index in (0, 1):
        changes = [(old, new) for i, old, new in seen if i == index]
        assert changes == [
            (MediatorState.CREATED, MediatorState.STARTING),
            (MediatorState.STARTING, MediatorState.RUNNING),
            (MediatorState.RUNNING, MediatorState.DONE),
        ]


def test_the_sigint_handler_is_the_one_from_before(sigint_ready, model, x):
    """Ctrl-C routing is ours only while a trace runs on the main thread."""
    inside: list[Any] = []
    with model.trace(x):
        inside.append(signal.getsignal(signal.SIGINT))
        h = model.layers[0].output
    assert inside[0] is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
