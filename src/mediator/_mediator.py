"""The Mediator: one invoke body running in its own worker thread.

A mediator turns what its body does with Envoys (`.output`, `.output = v`, `.skip(v)`, barriers,
names bound by other bodies) into the events of the protocol described in `_interleaver.py`, and
blocks while it waits. It owns its lifecycle (`state`, see `_protocol.MediatorState`; changed only
through `enter_state`), its inbox, its open request (`waiting`) and ops, and its late-edit watch.
Whatever a body does, and whatever fails in the library around it (entering the caller's torch
state, say), its thread ends in DONE or CANCELLED and hands the baton on exactly once more; the
trace raises the body's exception in the caller with the body's own traceback.

Cancellation reaches a body two ways: `cancel_requested` makes its next request raise
`Cancelled`, and `interrupt()` raises `Cancelled` asynchronously in a body busy in its own code.
The asynchronous form is only ever sent while the body runs user code (`_in_user_code`, read and
cleared under `_lock`), and the body passes a checkpoint right after clearing it, so an
interrupt can never land inside a baton handoff.
"""

from __future__ import annotations

import builtins
import ctypes
import functools
import queue
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from . import _context, _workers
from ._callsite import first_user_frame, user_traceback
from ._errors import MissedProviderError, OutOfOrderError
from ._late_edits import LateEditWatch
from ._protocol import (
    BARRIER,
    NAME,
    RESULT,
    STEP,
    TRANSITIONS,
    VALUE,
    BodyStopped,
    Cancelled,
    Key,
    LoopEnd,
    MediatorState,
    Op,
    Request,
    Signal,
)
from ._torchstate import TorchState

if TYPE_CHECKING:
    from ._barrier import Barrier
    from ._interleaver import Interleaver

_STARTING, _RUNNING, _BLOCKED = MediatorState.STARTING, MediatorState.RUNNING, MediatorState.BLOCKED
_DONE, _CANCELLED = MediatorState.DONE, MediatorState.CANCELLED


class Mediator:
    """One invoke: a body to run, its rows of the batch, and its side of the protocol."""

    def __init__(
        self,
        tracer: Any,
        index: int,
        body: Callable[..., Any] | None,
        args: tuple[Any, ...],
        rows: slice | None,
        torch_state: TorchState,
        assigns: frozenset[str] = frozenset(),
        fallbacks: dict[str, Any] | None = None,
        code: types.CodeType | None = None,
        bound_elsewhere: frozenset[str] = frozenset(),
    ) -> None:
        self.tracer = tracer
        self.index = index
        self.body: Callable[..., Any] | None = body
        self.args: tuple[Any, ...] | None = args
        self.rows = rows
        self.torch_state = torch_state
        self.assigns = assigns  # names a with-body binds (for names other bodies wait on)
        self.fallbacks = fallbacks or {}
        self.code = code  # a with-body's code, to find its frame
        self.bound_elsewhere = bound_elsewhere  # names the trace's with-bodies bind
        self.state = MediatorState.CREATED
        self.ended = False  # DONE or CANCELLED (kept by `enter_state`)
        self.cancel_requested = False  # set by the canceller: the next request raises
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.interleaver: Interleaver | None = None
        self.waiting: Request | None = None
        self.ops: list[Op] = []
        self.watch = LateEditWatch()
        self.step = 0
        self.spelled: dict[int, str] = {}  # site -> the path the body wrote, where an alias
        self.loop_ended = False  # an open tr.iter loop of this body ended (the call returned)
        # the name this body last waited for, with where the model stood as the wait began
        # (`Interleaver.position`); None once it makes another blocking request
        self.name_wait: tuple[str, Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.final_locals: dict[str, Any] | None = None
        self.cut: tuple[str, tuple[str, int] | None] | None = None  # see `Waits.note_cuts`
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._in_user_code = False
        self._interrupted = False

    def __repr__(self) -> str:
        return f"<Mediator of invoke {self.index}, {self.state.name}>"

    def enter_state(self, new: MediatorState) -> None:
        """Move to state `new`; the transition must be one `TRANSITIONS` allows. (The two a
        read makes, RUNNING <-> BLOCKED, are written out in `_block`, with their assertion.)"""
        assert new in TRANSITIONS[self.state], f"{self!r}: {self.state.name} -> {new.name}"
        self.state = new
        self.ended = new is _DONE or new is _CANCELLED

    # -- lifecycle (the baton holder) ---------------------------------------------------------

    def launch(self, interleaver: Interleaver) -> None:
        """Hand this mediator, with the baton, to a worker thread. If no worker can take it
        (a thread that cannot start, a CPU that cannot be pinned), the mediator is CANCELLED
        and the error is raised to the caller, which fails the trace with it."""
        self.interleaver = interleaver
        self.enter_state(_STARTING)
        try:
            _workers.submit(self._run, interleaver.cpu)
        except BaseException:
            self.enter_state(_CANCELLED)
            self.body = self.args = None
            raise

    def end_unstarted(self) -> None:
        """The body has nothing to run (only `pass`, `...` or strings): it is DONE as built."""
        self.enter_state(_DONE)
        self.final_locals = {}

    def cancel_unstarted(self) -> None:
        """The trace is cancelled before this mediator was started: it never will be."""
        self.enter_state(_CANCELLED)
        self.body = self.args = None

    def interrupt(self) -> None:
        """Raise `Cancelled` in the body if it is busy in its own code (after Ctrl-C)."""
        with self._lock:
            if self._in_user_code and self.thread is not None and not self._interrupted:
                self._interrupted = True
                _async_raise(self.thread, Cancelled)

    # -- the worker thread -------------------------------------------------------------------

    def _run(self, done: Callable[[], None]) -> None:
        """The worker's job: run the body in the caller's torch state, then END. Never raises;
        hands the baton on exactly once, after `done()` gave the worker back to the pool."""
        interleaver = self.interleaver
        assert interleaver is not None
        self.thread = threading.current_thread()
        _context.set_current(self)
        try:
            self.torch_state.enter()  # undone by the pool when the job is done (`done`)
            self._run_body()
        except Cancelled:  # cancelled before the body began, or interrupted around it
            pass
        except BaseException as error:  # noqa: BLE001 - the library's own steps failed
            self.error = self.error or error
        if self.state is _STARTING or self.state is _RUNNING:
            cancelled = self.error is None and self.cancel_requested
            self.enter_state(_CANCELLED if cancelled else _DONE)
        self.body = self.args = None  # its ops stay: an op never used fails the trace
        self.watch.past = []
        self.watch.frame = None  # the body's frame: it holds the body's values
        self.interleaver = None
        self.thread = None
        _context.set_current(None)
        done()
        interleaver.pass_baton(self)

    def _run_body(self) -> None:
        if self.cancel_requested:
            raise Cancelled
        self.enter_state(_RUNNING)
        body, args = self.body, self.args
        assert body is not None and args is not None
        self._in_user_code = True
        try:
            self.result = body(*args)
        except Cancelled:
            self.enter_state(_CANCELLED)
        except BodyStopped:  # tr.stop(): the body ends there, as with return
            pass
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            if isinstance(error, NameError) and error.name in self.bound_elsewhere:
                _explain_unbound(error)
            self.error = error.with_traceback(user_traceback(error.__traceback__))
        finally:
            self._leave_user_code()
        if self.watch.past and self.state is _RUNNING and self.interleaver is not None:
            self.watch.check(self.interleaver.current, ended=True)

    def _leave_user_code(self) -> None:
        """From here on no interrupt is sent; one sent just before is raised at `_checkpoint`."""
        with self._lock:
            self._in_user_code = False
        _checkpoint()

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
        """STEP: block until the model may reach step `step`; `LoopEnd` if the call ended."""
        interleaver = self._live()
        if interleaver.forward_done:
            raise LoopEnd
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
        if type(result) is Signal:
            _raise(result)
        return result

    def stop(self) -> NoReturn:
        """STOP: end the forward pass after the current point, and this body here."""
        self._live().stopped_by = self.index
        raise BodyStopped

    def lookup_name(self, name: str) -> Any:
        """A name this with-body reads (and has not bound itself) that an earlier body binds:
        the nearest earlier binding, waited for if need be; else the value from before the
        trace, else the builtin."""
        interleaver = self._live()
        provider, value = interleaver.lookup(self, name)
        if provider is not None:
            return value
        unbound: NameError | None = None
        if interleaver.may_bind(self, name):
            interleaver.name_waits += 1
            try:
                position = interleaver.position()
                value = self._block(Request(NAME, name))
                self.name_wait = (name, position)
                return value
            except NameError as error:
                unbound = error
        if name in self.fallbacks:
            return self.fallbacks[name]
        if hasattr(builtins, name):
            return getattr(builtins, name)
        if unbound is not None:
            raise unbound
        raise NameError(f"name {name!r} is not defined: no earlier invoke of this trace bound it")

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
        if name in scope:  # a shared name is no parameter: in its frame only once it bound it
            return True, scope[name]
        return False, None

    def label(self) -> str:
        """`invoke i` and where its body is, for messages (while the body has not ended)."""
        code = self.code
        if code is not None:
            return (
                f"invoke {self.index} (its with-body at {code.co_filename}:{code.co_firstlineno})"
            )
        body = self.body.func if isinstance(self.body, functools.partial) else self.body
        return f"invoke {self.index} ({getattr(body, '__qualname__', 'a function')})"

    def blocked_line(self) -> tuple[str, int] | None:
        """The user's line where this BLOCKED body waits (read from its thread's stack)."""
        thread = self.thread
        frame = None if thread is None else sys._current_frames().get(thread.ident or -1)
        frame = first_user_frame(frame)
        return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)

    def _body_frame(self) -> Any:
        thread = self.thread
        if thread is None or thread.ident is None:
            return None
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code is not self.code:
            frame = frame.f_back
        return frame

    def _live(self) -> Interleaver:
        if self.cancel_requested:
            raise Cancelled
        interleaver = self.interleaver
        assert interleaver is not None
        return interleaver

    def _check_order(self, interleaver: Interleaver, key: Key) -> None:
        passed = interleaver.passed(key)
        if not passed and not interleaver.forward_done:
            return  # the request is in time (every read takes this path: keep it short)
        what = interleaver.describe(key, self)
        if self.loop_ended and interleaver.forward_done:
            error = OutOfOrderError if passed else MissedProviderError
            raise error(
                f"{what} was requested after an open `tr.iter[a:]` loop of this body ended: "
                "such a loop ends only when the traced call has returned, so the model computes "
                "nothing more. Read the value inside the loop, use tr.result for the call's "
                "return value, or loop over a bounded range (tr.iter[0:n]), after which the "
                "model still runs"
            )
        if passed:
            here = interleaver.current
            where = f" (it is now at {here.describe(self)})" if here is not None else ""
            raise OutOfOrderError(
                f"{what} was requested after the model had already computed it{where}. "
                f"{self._name_wait_hint(interleaver, key)}Request values in the order the "
                "model computes them; to use a value in a later invoke, read it in an earlier one"
            )
        if interleaver.forward_done:
            raise MissedProviderError(
                f"{what} was requested after the forward pass ended: {interleaver.never(key)}"
            )

    def _name_wait_hint(self, interleaver: Interleaver, key: Key) -> str:
        """Why `key` was passed, if the model passed it while this body waited for a name."""
        if self.name_wait is None:
            return ""
        name, position = self.name_wait
        if interleaver.passed(key, position):
            return ""  # already passed when the wait began: the wait is not why
        provider, _ = interleaver.lookup(self, name)
        who = "another invoke" if provider is None else f"invoke {provider.index}"
        return (
            f"This body waited for the name {name!r}, which {who} binds, and the model ran on "
            f"meanwhile: request {interleaver.describe(key, self)} before the line that uses "
            f"{name!r}. "
        )

    def _block(self, request: Request) -> Any:
        """Make `request`, hand the baton on, and wait for the reply."""
        interleaver = self.interleaver
        assert interleaver is not None
        self._leave_user_code()
        if self.watch.past:
            self.watch.check(interleaver.current, ended=False)
        self.name_wait = None
        self.waiting = request
        assert self.state is _RUNNING  # RUNNING -> BLOCKED, inline: every read passes here
        self.state = _BLOCKED
        interleaver.pass_baton(self)
        reply = self.inbox.get()
        self.state = _RUNNING  # BLOCKED -> RUNNING: this thread holds the baton again
        self._in_user_code = True
        if self.watch.past:
            self.watch.snapshot()
        if type(reply) is Signal:
            _raise(reply)
        return reply


def _raise(signal: Signal) -> NoReturn:
    """Raise the signal's error, emptying `signal` first. The traceback keeps the frames it
    passes through, so a frame that still held the error (here, or the caller's `reply`) would
    form a cycle with it: the error, its frames and every value they hold would then wait for the
    cycle collector instead of going when the error is handled."""
    error, signal.error = signal.error, None  # type: ignore[assignment]
    try:
        raise error
    finally:
        del error


def _async_raise(thread: threading.Thread, error: type[BaseException]) -> None:
    """Raise `error` in `thread` at its next check for pending events (a call or a loop)."""
    ident = thread.ident
    if ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(error))


def _checkpoint() -> None:
    """Does nothing, but entering it runs the interpreter's pending-event check, where an
    asynchronous `Cancelled` sent just before is raised."""


def _explain_unbound(error: NameError) -> None:
    """A function invoke read, as a global or closure variable, a name that a with-body of its
    trace binds: say why it is not there yet."""
    error.args = (
        f"{error.args[0] if error.args else error}: a with-body of this trace binds "
        f"{error.name!r}, but a with-body's names reach the caller's scope only when the trace "
        "ends, so a function invoke cannot read them as globals or closure variables; pass the "
        "value to it as an argument, or through an object both share (a dict the with-body "
        "fills)",
    )
