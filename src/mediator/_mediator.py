"""The Mediator: one invoke body running in its own worker thread.

A mediator turns what its body does with Envoys (`.output`, `.output = v`, `.skip(v)`, barriers,
names bound by other bodies) into the events of the protocol described in `_interleaver.py`, and
blocks while it waits. Whatever a body does, its thread ends the body by reporting END: its
result or its exception, which the trace raises in the caller with the body's own traceback.

A mediator also watches the tensors it was handed at a boundary the model passed while the body
waited: one that changes in place before the body hands the baton on again was edited too late
(the model has used it), and the trace reports it as a `LateEditWarning`.
"""

from __future__ import annotations

import builtins
import ctypes
import os
import queue
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from ._errors import MissedProviderError, OutOfOrderError, UsageError, _Cancelled, _LoopEnd
from ._interleaver import (
    BARRIER,
    NAME,
    RESULT,
    STEP,
    VALUE,
    Barrier,
    Interleaver,
    Key,
    Op,
    Request,
    _Signal,
)
from ._torchstate import TorchState
from ._tree import tensors
from ._workers import POOL

_local = threading.local()
_HERE = os.path.dirname(__file__)


def current_mediator(what: str) -> Mediator:
    """The mediator whose body runs on this thread; UsageError outside any invoke body.
    `what` names the thing used, for the error message."""
    mediator: Mediator | None = getattr(_local, "mediator", None)
    if mediator is None:
        raise UsageError(
            f"{what} can only be used inside an invoke body (the code under "
            "`with model.trace(x):` or `with tr.invoke(x):`, or a function passed to "
            "`tr.invoke(x).run(fn)`); outside a trace, call the model or module directly"
        )
    return mediator


class Mediator:
    """One invoke: a body to run, its rows of the batch, and its side of the protocol."""

    def __init__(
        self,
        tracer: Any,
        index: int,
        body: Callable[..., Any] | None,
        args: tuple[Any, ...],
        rows: slice | None,
        state: TorchState,
        assigns: frozenset[str] = frozenset(),
        fallbacks: dict[str, Any] | None = None,
    ) -> None:
        self.tracer = tracer
        self.index = index
        self.body: Callable[..., Any] | None = body
        self.args: tuple[Any, ...] | None = args
        self.rows = rows
        self.state = state
        self.assigns = assigns  # names a with-body binds (for names other bodies wait on)
        self.fallbacks = fallbacks or {}
        self.initial: dict[str, Any] = {}  # values the body's names had before it ran
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.interleaver: Interleaver | None = None
        self.waiting: Request | None = None
        self.ops: list[Op] = []
        # tensors this body was handed at boundaries the model passed while it waited (weakly: a
        # value the body dropped is freed as before), with their version counters as of when it
        # got the baton back: an in-place change before it hands the baton on came too late.
        # Each value is watched for that one stretch, so a handoff costs what it was handed.
        self.past: list[tuple[Key, weakref.ref[torch.Tensor], int]] = []
        self.late_edits: list[tuple[str, tuple[str, int] | None]] = []  # for the tracer to warn
        self.step = 0
        self.bound = self.done = self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.code: types.CodeType | None = None  # a with-body's code, to find its frame
        self.final_locals: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_body = False
        self._interrupted = False

    def __repr__(self) -> str:
        return f"<Mediator of invoke {self.index}>"

    # -- lifecycle (model thread) -----------------------------------------------------------

    def bind(self, interleaver: Interleaver) -> None:
        self.interleaver = interleaver
        self.bound = True

    def launch(self) -> None:
        assert self.interleaver is not None
        POOL.submit(self._run, self.interleaver.cpu)

    def interrupt(self) -> None:
        """Raise `_Cancelled` in the body if it is busy in its own code (after Ctrl-C)."""
        with self._lock:
            if self._in_body and self.thread is not None and not self._interrupted:
                self._interrupted = True
                async_raise(self.thread, _Cancelled)

    # -- the worker thread -------------------------------------------------------------------

    def _run(self, done: Callable[[], None]) -> None:
        self.thread = threading.current_thread()
        _local.mediator = self
        interleaver = self.interleaver
        assert interleaver is not None
        try:
            try:
                self.state.enter()
                with self._lock:
                    self._in_body = True
                try:
                    if self.cancelled:
                        raise _Cancelled
                    assert self.body is not None and self.args is not None
                    self.result = self.body(*self.args)
                    if self.past:
                        self._look_for_late_edits(ended=True)
                finally:
                    with self._lock:
                        self._in_body = False
            except _Cancelled:
                pass
            except BaseException as error:  # noqa: BLE001 - reported to the caller
                self.error = error.with_traceback(_user_traceback(error.__traceback__))
        except _Cancelled:  # an interrupt that landed after the body ended
            pass
        if self._interrupted:
            try:
                _absorb_pending_interrupt()
            except _Cancelled:
                pass
        _local.mediator = None
        self.body = self.args = None
        self.thread = None
        self.done = True
        done()
        interleaver.pass_baton(self)

    # -- requests (worker thread, holding the baton) ------------------------------------------

    def value(self, key: Key) -> Any:
        """VALUE: the value at `key` for this invoke's rows, waiting until the model gets there."""
        interleaver = self._live()
        current = interleaver.current
        if current is not None and current.key == key:
            return current.view(self)
        self._check_order(interleaver, key)
        interleaver.expect(key, self)
        return self._block(Request(VALUE, key))

    def swap(self, key: Key, apply: Callable[[Any], Any], where: str) -> None:
        """SWAP: replace the value at `key` by `apply(old view)`; does not wait."""
        interleaver = self._live()
        current = interleaver.current
        if current is not None and current.key == key:
            current.swap(self, apply, where)
            return
        self._check_order(interleaver, key)
        interleaver.expect(key, self)
        self.ops.append(Op(key, apply, None, where))

    def skip(self, key: Key, value: Any, where: str) -> None:
        """SKIP: the call at `key` (an input boundary) does not run for this invoke."""
        interleaver = self._live()
        current = interleaver.current
        if current is not None and current.key == key:
            current.skips[self] = (value, where)
            return
        self._check_order(interleaver, key)
        interleaver.expect(key, self)
        self.ops.append(Op(key, None, value, where))

    def wait_at_barrier(self, barrier: Barrier) -> None:
        """BARRIER: block until every party of `barrier` has arrived."""
        interleaver = self._live()
        if barrier not in interleaver.barriers:
            interleaver.barriers.append(barrier)
        barrier.arrived.append(self)
        self._block(Request(BARRIER, barrier))

    def wait_for_step(self, step: int) -> None:
        """STEP: block until the model may reach step `step`; `_LoopEnd` if the call ended."""
        interleaver = self._live()
        if interleaver.forward_done:
            raise _LoopEnd
        interleaver.step_waits += 1
        if interleaver.step_waits == 1 or step < interleaver.step_floor:
            interleaver.step_floor = step
        self._block(Request(STEP, step))

    def traced_result(self) -> Any:
        """RESULT: the traced call's return value for this invoke's rows, once it returned."""
        interleaver = self._live()
        if not interleaver.forward_done:
            return self._block(Request(RESULT, None))
        result = interleaver.result_for(self)
        if type(result) is _Signal:
            _raise(result)
        return result

    def lookup_name(self, name: str) -> Any:
        """A name this with-body reads and another body binds: wait until one has bound it."""
        interleaver = self._live()
        found, value = interleaver._lookup(self, name)
        if found:
            return value
        try:
            interleaver.name_waits += 1
            return self._block(Request(NAME, name))
        except NameError:
            if name in self.fallbacks:
                return self.fallbacks[name]
            if hasattr(builtins, name):
                return getattr(builtins, name)
            raise

    def keep_locals(self, scope: dict[str, Any]) -> None:
        """Called by a with-body as it ends: the names it bound, to write back and share."""
        self.final_locals = scope

    def binding(self, name: str) -> tuple[bool, Any]:
        """Whether this body has bound `name` so far, and to what."""
        if name not in self.assigns:
            return False, None
        if self.final_locals is not None:
            scope = self.final_locals
        else:
            frame = self._body_frame()
            if frame is None:
                return False, None
            scope = frame.f_locals
        if name in scope:
            value = scope[name]
            if name in self.initial and value is self.initial[name]:
                return False, None  # still the value from before the trace: not bound yet
            return True, value
        return False, None

    def _body_frame(self) -> Any:
        thread = self.thread
        if thread is None or thread.ident is None:
            return None
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        return frame

    def _live(self) -> Interleaver:
        if self.cancelled:
            raise _Cancelled
        interleaver = self.interleaver
        assert interleaver is not None
        return interleaver

    def keep_watching(self, key: Key, view: Any) -> None:
        """The boundary `key`, where this body was handed `view`, is over (model thread)."""
        for leaf in tensors(view):
            if not leaf.is_inference():
                self.past.append((key, weakref.ref(leaf), leaf._version))

    def _look_for_late_edits(self, ended: bool) -> None:
        """Note the values of passed boundaries that this body changed in place since it got
        the baton back, with the body's current line (none once it `ended`) for the warning, and
        stop watching them. An edit of memory that the value the model stands at shares (a view,
        or the same tensor as the next module's input) is in time and is not reported."""
        interleaver = self.interleaver
        assert interleaver is not None
        shared: set[int | None] | None = None
        for key, ref, version in self.past:
            leaf = ref()
            if leaf is None or leaf._version == version:
                continue
            if shared is None:
                shared = _storages(interleaver.current)
            storage = _storage(leaf)
            if storage is not None and storage not in shared:
                where = None if ended else _body_line()
                self.late_edits.append((interleaver.describe(key), where))
        self.past = []

    def _snapshot_past(self) -> None:
        """The body gets the baton: what the model changed meanwhile is not the body's doing."""
        live = ((key, ref, ref()) for key, ref, _ in self.past)
        self.past = [(key, ref, leaf._version) for key, ref, leaf in live if leaf is not None]

    def _check_order(self, interleaver: Interleaver, key: Key) -> None:
        if interleaver.passed(key):
            here = interleaver.current
            where = f" (it is now at {here.describe()})" if here is not None else ""
            raise OutOfOrderError(
                f"{interleaver.describe(key)} was requested after the model had already "
                f"computed it{where}. Request values in the order the model computes them; "
                "to use a value in a later invoke, read it in an earlier one"
            )
        if interleaver.forward_done:
            raise MissedProviderError(
                f"{interleaver.describe(key)} was requested after the forward pass ended: "
                f"{interleaver._never(key)}"
            )

    def _block(self, request: Request) -> Any:
        interleaver = self.interleaver
        assert interleaver is not None
        if self.past:
            self._look_for_late_edits(ended=False)
        self.waiting = request
        interleaver.pass_baton(self)
        reply = self.inbox.get()
        if self.past:
            self._snapshot_past()
        if type(reply) is _Signal:
            if isinstance(reply.error, _Cancelled):
                self.cancelled = True
            _raise(reply)
        return reply


def _raise(signal: _Signal) -> NoReturn:
    """Raise the signal's error, emptying `signal` first. The traceback keeps the frames it
    passes through, so a frame that still held the error (here, or the caller's `reply`) would
    form a cycle with it: the error, its frames and every value they hold would then wait for the
    cycle collector instead of going when the error is handled."""
    error, signal.error = signal.error, None  # type: ignore[assignment]
    try:
        raise error
    finally:
        del error


def async_raise(thread: threading.Thread, error: type[BaseException]) -> None:
    """Raise `error` in `thread` at its next check for pending events (a call or a loop)."""
    ident = thread.ident
    if ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(error))


def _storages(boundary: Any) -> set[int | None]:
    """Where the tensors of `boundary` (its value and every invoke's view) keep their data."""
    if boundary is None:
        return set()
    values = [boundary.value, *boundary.views.values()]
    return {_storage(leaf) for value in values for leaf in tensors(value)}


def _storage(tensor: torch.Tensor) -> int | None:
    """Where `tensor` keeps its data; None where torch does not say (sparse and other layouts
    without one storage), and such a tensor is never reported."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _body_line() -> tuple[str, int] | None:
    """The file and line of the body's code that called into this package."""
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_HERE):
        frame = frame.f_back
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def _absorb_pending_interrupt() -> None:
    """Does nothing, but entering it runs the interpreter's pending-event check, where an
    asynchronous `_Cancelled` sent just before the body ended is raised (and then caught)."""


def _user_traceback(tb: Any) -> Any:
    """Drop the frames of this package from a traceback, keeping the user's own."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_HERE):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt
