"""The requests that wait for something other than a boundary, and the end of the forward.

`Waits` is the part of the `Interleaver` (its base class) that serves NAME, BARRIER, STEP and
RESULT requests and, once the traced call returned, ends every request still open
(`finish`), with errors that say why a value never came; after `tr.stop()` it notes which
request each body still waiting was cut short at (`note_cuts`). It reads and writes the
interleaver's state (the mediators' requests, the barriers, the counts of name and step waits)
only while the calling thread holds the baton; the protocol is described in `_interleaver.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._batcher import narrow_with
from ._errors import MediatorError, MissedProviderError
from ._protocol import (
    BARRIER,
    NAME,
    RESULT,
    STEP,
    VALUE,
    Abort,
    Key,
    LoopEnd,
    MediatorState,
    Signal,
)

if TYPE_CHECKING:
    from ._barrier import Barrier
    from ._batcher import Batcher
    from ._boundary import Boundary
    from ._layouts import Dims
    from ._mediator import Mediator

_BLOCKED = MediatorState.BLOCKED

#: `result` before the traced call returned (or when `tr.stop()` ended it).
MISSING: Any = object()


class Waits:
    """NAME, BARRIER, STEP and RESULT requests, and the end of the forward pass."""

    paths: list[str]
    mediators: list[Mediator]
    batcher: Batcher
    total: int
    expand: tuple[int, ...]
    result_dims: Dims  # where the traced call's return value holds the batch
    started: list[int]
    watch: tuple[list[int], list[int]]
    current: Boundary | None
    forward_done: bool
    failure: BaseException | None
    barriers: list[Barrier]
    name_waits: int
    step_waits: int
    step_floor: int
    result: Any

    if TYPE_CHECKING:

        def _resume(self, mediator: Mediator, reply: Any) -> None: ...

        def describe(self, key: Key, by: Mediator | None = None) -> str: ...

    def finish(self, result: Any) -> None:
        """The traced call returned `result`: answer RESULT and STEP requests, then fail every
        request that is still open, until all bodies end."""
        self.forward_done = True
        self.current = None
        self.result = result
        while True:
            blocked = [m for m in self.mediators if m.state is _BLOCKED]
            if not blocked:
                self._check_unused_ops()
                return
            mediator = next((m for m in blocked if _waits_for(m, RESULT, STEP)), None)
            if mediator is not None:
                waiting = mediator.waiting
                assert waiting is not None
                self._withdraw(mediator)
                if waiting.kind == RESULT:
                    self._resume(mediator, self.result_for(mediator))
                else:
                    self._resume(mediator, Signal(LoopEnd()))
                self._settle()
                continue
            mediator = next((m for m in blocked if _waits_for(m, VALUE) or m.ops), None)
            if mediator is None:
                if self._settle():
                    continue
                mediator = blocked[0]  # waits on a name or barrier nobody can satisfy now
            self._resume(mediator, Signal(self._unserved(mediator)))
            self._settle()

    def note_cuts(self, stopper: int) -> None:
        """`tr.stop()` in invoke `stopper` ended the forward: note in each body still blocked
        (about to be cancelled) the message of its `StoppedWarning`, and the line to report."""
        for mediator in self.mediators:
            waiting = mediator.waiting
            if mediator.state is not _BLOCKED or waiting is None:
                continue
            if waiting.kind == VALUE:
                what = self.describe(waiting.target, mediator)
            elif waiting.kind == STEP:
                what = f"step {waiting.target} of its open tr.iter loop"
            elif waiting.kind == NAME:
                what = f"the name {waiting.target!r} (bound by another invoke)"
            elif waiting.kind == BARRIER:
                what = f"tr.barrier({waiting.target.parties})"
            else:
                what = "tr.result"
            message = (
                f"{mediator.label()} was cut short at {what}: tr.stop() in invoke {stopper} "
                "ended the forward pass first, so the rest of that body did not run and the "
                "names it would have bound from there on keep their earlier values. If that "
                "body needs what comes later, call tr.stop() after it"
            )
            mediator.cut = (message, mediator.blocked_line())

    def result_for(self, mediator: Mediator) -> Any:
        """The traced call's return value, narrowed to `mediator`'s rows."""
        if self.result is MISSING:
            return Signal(
                MissedProviderError(
                    "tr.result: the traced call did not return (tr.stop() ended it)"
                )
            )
        if mediator.rows is None:
            return self.result
        return narrow_with(
            self.batcher, self.result, mediator.rows, self.total, self.result_dims, self.expand
        )

    def _wake_steps(self, call: int) -> None:
        """A module starts call `call`: resume the open loops waiting for a step up to it."""
        ready = True
        while ready:
            ready = False
            for mediator in self.mediators:
                waiting = mediator.waiting
                if waiting is not None and waiting.kind == STEP and waiting.target <= call:
                    self._withdraw(mediator)
                    self._resume(mediator, None)
                    self._settle()
                    ready = True
        floors = [m.waiting.target for m in self.mediators if m.waiting and m.waiting.kind == STEP]
        self.step_floor = min(floors, default=0)

    def _check_unused_ops(self) -> None:
        for mediator in self.mediators:
            if mediator.ops:
                self.failure = self.failure or self._unserved(mediator)
                raise Abort

    def _withdraw(self, mediator: Mediator) -> None:
        waiting = mediator.waiting
        if waiting is not None and waiting.kind == VALUE:
            self.watch[waiting.target[1]][waiting.target[0]] -= 1
        elif waiting is not None and waiting.kind == BARRIER:
            waiting.target.arrived.remove(mediator)
        elif waiting is not None and waiting.kind == NAME:
            self.name_waits -= 1
        elif waiting is not None and waiting.kind == STEP:
            self.step_waits -= 1
        mediator.waiting = None

    def _settle(self) -> bool:
        """Release complete barriers and name waits that can be answered; True if any was."""
        if not self.barriers and not self.name_waits:
            return False
        progressed = False
        again = True
        while again:
            again = False
            for barrier in self.barriers:
                if len(barrier.arrived) >= barrier.parties:
                    released, barrier.arrived = barrier.arrived, []
                    for mediator in sorted(released, key=definition_order):
                        mediator.waiting = None
                        self._resume(mediator, None)
                    again = progressed = True
            for mediator in self.mediators:
                waiting = mediator.waiting
                if waiting is None or waiting.kind != NAME:
                    continue
                provider, value = self.lookup(mediator, waiting.target)
                if provider is None and self.may_bind(mediator, waiting.target):
                    continue
                self._withdraw(mediator)
                found = provider is not None
                self._resume(mediator, value if found else Signal(self._unbound(waiting.target)))
                again = progressed = True
        return progressed

    def lookup(self, asker: Mediator, name: str) -> tuple[Mediator | None, Any]:
        """The nearest earlier body that has bound `name`, and its binding; (None, None) if
        none can answer now: one that assigns it and has not bound it yet is waited for, one
        that ended without binding it is passed over. Later bodies never answer."""
        for mediator in reversed(self.mediators[: asker.index]):
            if name in mediator.assigns:
                found, value = mediator.binding(name)
                if found:
                    return mediator, value
                if not mediator.ended:
                    return None, None
        return None, None

    def may_bind(self, asker: Mediator, name: str) -> bool:
        earlier = self.mediators[: asker.index]
        return any(not m.ended and name in m.assigns for m in earlier)

    @staticmethod
    def _unbound(name: str) -> NameError:
        return NameError(
            f"name {name!r} is not defined: no earlier invoke of this trace bound it "
            "before the forward pass ended"
        )

    def _unserved(self, mediator: Mediator) -> BaseException:
        """The error for a blocked mediator whose request the finished forward cannot serve."""
        waiting = mediator.waiting
        self._withdraw(mediator)
        if mediator.ops:
            op = mediator.ops.pop(0)
            self.watch[op.key[1]][op.key[0]] -= 1
            what = "skip of" if op.apply is None else "value set for"
            return MissedProviderError(
                f"the {what} {self.describe(op.key, mediator)} at {op.where} was never used: "
                f"{self.never(op.key)}"
            )
        assert waiting is not None
        if waiting.kind == VALUE:
            return MissedProviderError(
                f"{self.describe(waiting.target, mediator)} was never computed: "
                f"{self.never(waiting.target)}"
            )
        if waiting.kind == BARRIER:
            barrier = waiting.target
            return MediatorError(
                f"tr.barrier({barrier.parties}) was reached by only "
                f"{len(barrier.arrived) + 1} bodies before the forward pass ended; every body "
                "that shares a barrier must call it"
            )
        return self._unbound(waiting.target)

    def grow(self) -> None:
        """Count the sites added to the model since this trace began (operations inside a
        forward, named by a body through `.source`). Called by the baton holder."""
        missing = len(self.paths) - len(self.started)
        if missing > 0:
            self.started.extend([0] * missing)
            self.watch[0].extend([0] * missing)
            self.watch[1].extend([0] * missing)

    def never(self, key: Key) -> str:
        """Why boundary `key` never came, for messages."""
        site, _, call = key
        calls = self.started[site]
        path = self.paths[site] or "the model"
        if calls == 0:
            return f"{path} was not called in this forward pass"
        return f"{path} was called {calls} time(s) in this forward pass, so call {call} never came"


def definition_order(mediator: Mediator) -> int:
    """Sort key: invokes are served in the order they are defined."""
    return mediator.index


def _waits_for(mediator: Mediator, *kinds: str) -> bool:
    return mediator.waiting is not None and mediator.waiting.kind in kinds
