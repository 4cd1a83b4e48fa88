"""The Interleaver: the model side of a trace, and the protocol it keeps with the mediators.

Threads
    One *model thread* (the thread that opened the trace) runs the forward pass. Each invoke runs
    as a *mediator* on a worker thread (`_mediator.py`). Every mediator has an inbox (a
    `SimpleQueue`); the interleaver has one inbox too.

The baton
    At any moment exactly one of these threads runs trace code; every other one is blocked in a
    `get()` on its own inbox. Handing over is `their_inbox.put(...)` followed at once by
    `my_inbox.get()`, and nothing else (`handoffs` counts the puts). So no state below needs a
    lock, except the two fields a canceller and a baton holder can race on (`cancelling`,
    `abandoned`), which `handoff_lock` guards: only the baton holder reads or writes the rest.

States of a mediator (`_protocol.MediatorState`, changed only through `enter_state`)
    CREATED -> STARTING (handed to a worker with the baton) -> RUNNING (its body runs) <->
    BLOCKED (a request made, `waiting` set, baton handed on) -> DONE (returned or raised), or
    CANCELLED (ended by cancellation, or never started). A with-body with nothing to run (only
    `pass`, `...` or strings) goes from CREATED to DONE as it is built: no worker, no baton.
    A mediator that is not BLOCKED, DONE,
    CANCELLED or CREATED holds the baton; `running` names the one the model thread handed it to.

The plan: handing the baton on directly
    The model thread decides who runs at a point of the trace: at the start, every mediator in
    definition order; at a boundary, the mediators due there in definition order. It writes that
    list into `plan` and hands the baton to the first (`_run_plan`). A mediator that blocks or
    ends (`pass_baton`) does the next step of the plan itself (`_advance`): it starts the next
    mediator, or applies the next one's swaps and resumes it with its value, and only when the
    plan is done does the baton go back to the model thread. N mediators at one point thus cost
    N + 1 thread switches, not 2N. The chain goes back to the model thread early whenever that
    thread has something to decide: the mediator failed, `tr.stop()` was called, barriers or
    name waits exist (`_settle`), or the trace is being cancelled.

Events, mediator -> interleaver (each a field of the mediator that the interleaver reads once
it has the baton back)
    VALUE   `mediator.waiting = Request(VALUE, key)`: blocks until the model reaches `key`
            (site, INPUT/OUTPUT, call). A request for the boundary the model stands at is
            answered by the mediator itself, without a handoff; one for a boundary already
            passed raises `OutOfOrderError` in the body at once.
    SWAP    `mediator.ops.append(Op(key, ...))`: does not block. Applied when the model reaches
            `key` (or at once when it stands there). A late error (wrong shape, never reached)
            is raised in the body at the request it is blocked on, naming the line of the swap.
    SKIP    like SWAP, at the input boundary of a call: the call does not run for that invoke
            (`_skips.py`; when every row skips, the values are checked against the output a
            copy of the module gives on fake tensors).
    BARRIER `mediator.waiting = Request(BARRIER, barrier)`: blocks until every participant
            arrived; the interleaver then resumes them in definition order.
    NAME    `mediator.waiting = Request(NAME, name)`: a with-body reads a name it has not bound
            itself that an earlier body binds; blocks until the nearest earlier body that may
            still bind it has bound it or ended (`Waits.lookup`).
    STEP    `mediator.waiting = Request(STEP, k)`: an open `tr.iter[a:]` loop asks for step k;
            answered when any module starts a call numbered k or more (no request of step k can
            then be late), or with `LoopEnd` when the traced call returns first.
    RESULT  `mediator.waiting = Request(RESULT, None)`: `tr.result` inside a body; answered once
            the traced call has returned.
    STOP    `interleaver.stopped_by = index` (`tr.stop()`, which then ends its body like
            `return`): the model thread serves the rest of the current point (the plan, barriers,
            names), then raises `StopForward` to end the forward. Bodies still waiting then are
            cut (`note_cuts`: a `StoppedWarning` each) and cancelled.
    CACHE   `interleaver.open_cache(cache)` (`tr.cache()`): the cached sites become watched, and
            after every boundary of them is served its merged value is recorded. Needs no
            answer.
    END     the mediator enters DONE or CANCELLED: the body returned (`result`) or raised
            (`error`), and the mediator hands the baton on one last time.

Replies, interleaver -> mediator (what `get()` returns in the mediator)
    a value (VALUE, NAME), None (BARRIER, STEP released), or a `Signal` carrying an exception to
    raise at the blocked request: MissedProviderError, NameError, ..., or `Cancelled`.

Order of a trace (`_run.run_trace` drives it)
    1. Start the mediators one by one in definition order (the plan); each runs until it
       blocks or ends. A worker that cannot be started fails the trace (the mediator is
       CANCELLED, the error is the trace's).
    2. Run the forward. At each boundary someone watches (`watch[kind][site] > 0`), serve
       the mediators due there (`due[key]`) in definition order (the plan): apply their ops for
       this boundary, then resume each one whose VALUE request is for it. When the baton comes
       back, settle barriers and name waits. A boundary nobody watches costs two list reads and no
       queue traffic; one somebody watches costs what its own events cost, however many
       invokes wait elsewhere. In a trace that builds a graph, a served boundary inside an
       activation-checkpointed region is handled as `_checkpointing.py` says.
    3. After the forward (`finish`, in `_waits.py` with the other non-boundary requests):
       answer RESULT requests and end open loops (STEP -> `LoopEnd`), in definition order;
       every other open request can no longer be served: resume each blocked mediator with
       MissedProviderError (or NameError, or an unfinished-barrier error) until all have ended.
    4. On any failure (an exception from a body, the model or the library, or Ctrl-C), `cancel`:
       the forward stops; under `handoff_lock`, `cancelling` is set and the plan dropped, so no
       mediator starts another; every mediator that has not ended is told so (its next request
       raises `Cancelled`). If a body holds the baton (Ctrl-C came while it ran) it is
       interrupted (`Cancelled` raised in its own code, never inside the library's) and the
       model thread waits for the baton. Then, one at a time, each BLOCKED mediator is resumed
       with `Cancelled` and waited for (CREATED ones become CANCELLED), so still only one body
       runs at any moment. After a Ctrl-C the model thread waits at most a second: if a body
       is stuck (in C code, say), `abandoned` is set and the rest of the cancellation travels
       with the baton (each mediator that ends resumes the next, `_cancel_next`) while the
       trace raises at once; the stuck worker rejoins the pool only once its body has ended.

Ctrl-C
    On the main thread a trace routes SIGINT to itself (`_interrupts.py`). In model code (the
    module's own forward, hooks, `generate`) it raises `KeyboardInterrupt` there, as without the
    library: the model thread holds the baton then. Anywhere else the signal sets `interrupted`
    and puts `SIGINT` into the inbox, so the model thread sees it where it waits (a `get()`,
    which the signal wakes) or at its next module call, never in the middle of the protocol; it
    then raises `KeyboardInterrupt` there, and `running` says who holds the baton.

Every wait has a way out: a mediator blocked in `get()` is always resumed (by the model thread,
which owns the order above, or along a plan or a cancellation chain by the mediator before it),
and the model thread waits only while some mediator holds the baton: each one ends in a request,
an END, or an exception turned into END, and hands the baton on; the last of a plan, or any one
that fails or sees `cancelling`, hands it back to the model thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ._batcher import Batcher, narrow_with
from ._boundary import Boundary
from ._cache import Cache
from ._checkpointing import enter_boundary, refuse_reentrant_writes
from ._errors import MediatorError
from ._interrupts import model_call_site
from ._layouts import Dims
from ._protocol import (
    INPUT,
    KIND_NAMES,
    OUTPUT,
    SIGINT,
    VALUE,
    Abort,
    Cancelled,
    Key,
    MediatorState,
    Signal,
    StopForward,
)
from ._skips import run_skipped
from ._waits import MISSING, Waits, definition_order

if TYPE_CHECKING:
    from ._barrier import Barrier
    from ._mediator import Mediator

_CREATED, _BLOCKED = MediatorState.CREATED, MediatorState.BLOCKED

#: Where the model stands: the calls of each site that began, and those still open.
Position = tuple[list[int], list[tuple[int, int]]]


class Interleaver(Waits):
    """Runs one batched forward pass and serves the mediators of a trace at its boundaries."""

    def __init__(
        self,
        paths: list[str],
        mediators: list[Mediator],
        batcher: Batcher,
        total: int,
        dims: tuple[list[Dims], list[Dims]] | None = None,
        expand: tuple[int, ...] = (),
        result_dims: Dims = None,
    ) -> None:
        self.paths = paths
        self.mediators = mediators
        self.batcher = batcher
        self.total = total
        self.builds_graph = torch.is_grad_enabled()  # the caller's: checkpointed regions matter
        # INPUT/OUTPUT -> site -> where its values hold the batch (`_layouts.py`)
        self.dims = dims or ([None] * len(paths), [None] * len(paths))
        self.expand = expand  # known factors the batch grows by (beam search: `_expansion.py`)
        self.generating = False  # the traced call is `generate`: KV caches carry across steps
        self.result_dims = result_dims
        sites = len(paths)
        self.started = [0] * sites  # calls of each site that began, numbered in that order
        # (site, call) of the calls that began and have not returned, innermost last (a module
        # that calls itself has several; call c's output boundary passed once c began and left)
        self.open_calls: list[tuple[int, int]] = []
        # open requests, ops and caches per site, for its inputs and for its outputs
        self.watch = ([0] * sites, [0] * sites)
        self.current: Boundary | None = None
        self.forward_done = False
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.running: Mediator | None = None  # who the model thread handed the baton to
        self.failure: BaseException | None = None
        self.barriers: list[Barrier] = []
        self.cpu: int | None = None  # the CPU the trace's threads are pinned to
        self.name_waits = 0  # mediators blocked on a NAME request
        self.step_waits = 0  # mediators blocked on a STEP request
        self.step_floor = 0  # the lowest step they wait for
        self.stopped_by: int | None = None  # the invoke that called tr.stop()
        self.interrupted = False  # a SIGINT arrived (`_interrupts.py`)
        self.result: Any = MISSING
        self.caches: list[Cache] = []
        self.due: dict[Key, list[Mediator]] = {}  # who has a request or op at each boundary
        self.plan: list[Mediator] = []  # who runs next at this point, the next one last
        self.handoffs = 0  # queue puts and worker launches: the cost model, counted
        self.rewired: dict[int, Callable[..., Any]] = {}  # site -> forward (`Tap.trace_with`)
        self.handoff_lock = threading.Lock()
        self.cancelling = False  # under handoff_lock: no mediator advances the plan any more
        self.abandoned = False  # under handoff_lock: the mediators carry the cancellation on

    # -- the model thread's side -------------------------------------------------------------

    def start(self) -> None:
        """Start every mediator in definition order and let each run to its first request."""
        self.plan = [m for m in reversed(self.mediators) if m.state is _CREATED]
        self._run_plan()

    @model_call_site
    def call(self, site: int, original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """One call of a tapped module by the model thread (see `_tap.Tap`). Its only calls
        out of this package are the module's own forward (`original`)."""
        if self.interrupted:
            raise KeyboardInterrupt
        call = self.started[site]
        if self.step_waits and call >= self.step_floor:
            self._wake_steps(call)  # before the call counts as started: its input is still ahead
            self._check_stop()
        self.started[site] = call + 1
        open_calls = self.open_calls
        open_calls.append((site, call))
        try:
            skip = None
            watch_inputs, watch_outputs = self.watch
            if watch_inputs[site]:
                boundary = self._serve((site, INPUT, call), (args, kwargs))
                args, kwargs = boundary.merged()
                original = self.rewired.get(site, original) if self.rewired else original
                if boundary.skips:
                    skip = boundary
            if skip is None:
                output = original(*args, **kwargs)
            else:
                output = run_skipped(self, skip, original, args, kwargs)
            if watch_outputs[site]:
                output = self._serve((site, OUTPUT, call), output).merged()
        finally:
            open_calls.pop()  # calls nest: the innermost open call is this one
        return output

    # -- cancelling (model thread) -------------------------------------------------------------

    def cancel(self, deadline: float | None) -> bool:
        """End every mediator that has not ended, one at a time; False if `deadline`
        (monotonic) passed first, in which case the mediators finish the cancellation among
        themselves (`abandoned`) and nothing waits for them."""
        with self.handoff_lock:  # no mediator advances the plan from now on
            self.cancelling = True
            self.plan = []
            holder = self.running  # stable from here: only the holder hands the baton back
        for mediator in self.mediators:
            mediator.cancel_requested = True  # its next request raises Cancelled
        if holder is not None:  # a body holds the baton: Ctrl-C came while it ran
            holder.interrupt()
            if not self._wait_while_cancelling(deadline):
                return False
        while self._cancel_next():
            if not self._wait_while_cancelling(deadline):
                return False
        return True

    def _cancel_next(self) -> bool:
        """Resume the first blocked mediator with `Cancelled` (whoever holds the baton calls
        this); mediators never started become CANCELLED. False when none is left to resume."""
        for mediator in self.mediators:
            state = mediator.state
            if state is _CREATED:
                mediator.cancel_unstarted()
            elif state is _BLOCKED:
                self.running = mediator
                self.handoffs += 1
                mediator.inbox.put(Signal(Cancelled()))
                return True
        return False

    def _wait_while_cancelling(self, deadline: float | None) -> bool:
        """Wait for the baton; at `deadline`, hand the rest of the cancellation to the
        mediators (under the lock, so a baton arriving just then is still taken)."""
        while True:
            try:
                if deadline is None:
                    item = self.inbox.get()
                else:
                    item = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                with self.handoff_lock:
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        self.abandoned = True
                        return False
            if item is not SIGINT:  # another Ctrl-C changes nothing: the deadline stands
                self.running = None
                return True

    # -- serving boundaries ------------------------------------------------------------------

    def expect(self, key: Key, mediator: Mediator) -> None:
        """`mediator` has a request or an op for boundary `key`: watch it."""
        self.watch[key[1]][key[0]] += 1
        self.due.setdefault(key, []).append(mediator)

    def _serve(self, key: Key, value: Any) -> Boundary:
        boundary = Boundary(self, key, value)
        versions = enter_boundary(value) if self.builds_graph else None  # `_checkpointing.py`
        self.current = boundary
        due = self.due.pop(key, None)
        if due is not None:
            if len(due) > 1:
                due = sorted(set(due), key=definition_order, reverse=True)
            self.plan = due
            self._run_plan()
        self.current = None
        if boundary.shared:
            boundary.check_shared()
        if versions is not None:
            refuse_reentrant_writes(self, boundary, versions)
        for mediator, view in boundary.handed:
            if not mediator.ended:
                mediator.watch.keep(key, view)
        if self.caches:
            self._record(boundary)
        return boundary

    def close(self) -> None:
        """Drop every reference to values of the trace (the trace has ended)."""
        self.current = None
        self.result = MISSING
        self.caches = []
        self.barriers = []
        self.due = {}
        self.plan = []
        with self.handoff_lock:
            if not self.abandoned:  # else the cancellation chain still walks them
                self.mediators = []

    def open_cache(self, cache: Cache) -> None:
        """Start recording the modules of `cache` (they become watched boundaries)."""
        self.grow()
        for site in cache.paths:
            self.watch[OUTPUT][site] += 1
            if cache.record_inputs:
                self.watch[INPUT][site] += 1
        self.caches.append(cache)

    def _record(self, boundary: Boundary) -> None:
        site, kind, _ = boundary.key
        value = None
        for cache in self.caches:
            if site not in cache.paths or (kind == INPUT and not cache.record_inputs):
                continue
            if value is None:
                value = boundary.merged()
            rows, dims = cache.rows, self.dims[kind][site]
            own = (
                value
                if rows is None
                else narrow_with(self.batcher, value, rows, self.total, dims, self.expand)
            )
            cache.record(site, kind == OUTPUT, own)

    def _apply_ops(self, mediator: Mediator, boundary: Boundary) -> MediatorError | None:
        """Apply `mediator`'s swaps and skips for `boundary`, in the order it made them; return
        the error of the first that does not fit (its later ops stay queued)."""
        ops = mediator.ops
        remaining = []
        for position, op in enumerate(ops):
            if op.key != boundary.key:
                remaining.append(op)
                continue
            self.watch[op.key[1]][op.key[0]] -= 1
            try:
                if op.apply is None:
                    boundary.skips[mediator] = (op.skip_value, op.where)
                else:
                    boundary.swap(mediator, op.apply, op.where)
            except MediatorError as error:
                mediator.ops = remaining + ops[position + 1 :]
                return error
        mediator.ops = remaining
        return None

    # -- the baton --------------------------------------------------------------------------

    def _run_plan(self) -> None:
        """Carry out `plan` (model thread): hand the baton along it, and settle barriers and
        name waits whenever it comes back, until the plan is done."""
        while self.plan:
            if not self._advance():
                if self.failure is not None:
                    raise Abort
                break
            self._wait_for_baton()
            self._settle()
        self._check_stop()

    def _check_stop(self) -> None:
        """End the forward here if a body called `tr.stop()` (the current point is served)."""
        if self.stopped_by is not None and not self.forward_done:
            raise StopForward

    def _advance(self) -> bool:
        """Do the next steps of the plan, on whichever thread holds the baton, until one hands
        the baton to a mediator (True) or the plan is done (False)."""
        plan = self.plan
        while plan:
            mediator = plan.pop()
            if mediator.state is _CREATED:
                self.running = mediator
                self.handoffs += 1
                try:
                    mediator.launch(self)
                except BaseException:
                    self.running = None
                    plan.clear()
                    raise
                return True
            boundary = self.current
            assert boundary is not None
            if mediator.ops:
                error = self._apply_ops(mediator, boundary)
                if error is not None:
                    if mediator.waiting is None:  # the body already ended: the trace fails
                        self.failure = self.failure or error
                        plan.clear()
                        return False
                    self._withdraw(mediator)
                    self.running = mediator
                    self.handoffs += 1
                    mediator.inbox.put(Signal(error))
                    return True
            waiting = mediator.waiting
            if waiting is not None and waiting.kind == VALUE and waiting.target == boundary.key:
                view = boundary.view(mediator)  # may raise: nothing is handed over yet
                self.watch[boundary.key[1]][boundary.key[0]] -= 1
                mediator.waiting = None
                self.running = mediator  # from here to the put nothing can fail
                self.handoffs += 1
                mediator.inbox.put(view)
                return True
        return False

    def pass_baton(self, mediator: Mediator) -> None:
        """`mediator` blocked or ended (its thread): hand the baton to the next mediator of the
        plan, or back to the model thread; if the model thread has stopped waiting (an abandoned
        cancellation), carry the cancellation on instead. The plan is advanced under
        `handoff_lock`, so that no mediator starts once cancelling began; the plain handback
        needs no lock: the model thread abandons only under the lock after finding its inbox
        empty, so a put it missed is one made after `abandoned` was set, seen right after it."""
        if self.plan and mediator.error is None and not self._needs_model_thread():
            with self.handoff_lock:
                if not self.cancelling:
                    try:
                        if self._advance():
                            return
                    except BaseException as error:  # noqa: BLE001 - the model thread raises it
                        self.failure = self.failure or error
                        self.plan = []
        self.handoffs += 1
        self.inbox.put(mediator)
        if self.abandoned:
            with self.handoff_lock:
                if not self._cancel_next():
                    self.mediators = []  # the chain is done: nothing of the trace is left

    def _needs_model_thread(self) -> bool:
        return self.stopped_by is not None or bool(self.barriers) or self.name_waits > 0

    def _resume(self, mediator: Mediator, reply: Any) -> None:
        """Hand the baton to a blocked mediator and wait until it blocks again or ends. Its own
        swaps and skips for the boundary the model stands at come first: a body released here
        early (by a barrier or a name) sees what it set."""
        current = self.current
        if current is not None and mediator.ops:
            error = self._apply_ops(mediator, current)
            if error is not None:
                reply = Signal(error)
        self.running = mediator
        self.handoffs += 1
        mediator.inbox.put(reply)
        self._wait_for_baton()

    def _wait_for_baton(self) -> None:
        item = self.inbox.get()  # the last one to hold the baton, or SIGINT
        if item is SIGINT:
            raise KeyboardInterrupt  # the baton is still with `running`: cancel interrupts it
        self.running = None
        if item.error is not None and self.failure is None:
            self.failure = item.error
        if self.failure is not None:
            self.plan = []
            raise Abort

    # -- for mediators (called while they hold the baton) ------------------------------------

    def passed(self, key: Key, position: Position | None = None) -> bool:
        """Whether the model already went past boundary `key` (now, or where it stood at an
        earlier `position()`): the input of a call that began, the output of one that returned
        (calls of a module that calls itself end innermost first, so the output of call 0 comes
        after those of the calls it made)."""
        started, open_calls = (self.started, self.open_calls) if position is None else position
        site, kind, call = key
        began = site < len(started) and started[site] > call  # a site added since: not yet
        return began if kind == INPUT else began and (site, call) not in open_calls

    def position(self) -> Position:
        """Where the model stands: a copy of the calls begun and open, for `passed`."""
        return list(self.started), list(self.open_calls)

    def describe(self, key: Key, by: Mediator | None = None) -> str:
        """`key` for a message, under the name the body `by` wrote for its module (an alias)."""
        site, kind, call = key
        path = self.paths[site] if by is None else by.spelled.get(site, self.paths[site])
        name = f"{path}.{KIND_NAMES[kind]}" if path else f"model.{KIND_NAMES[kind]}"
        return f"{name} (call {call})"
