"""The vocabulary of the protocol between the model thread and the mediators.

Keys name a boundary; requests and ops are what a mediator asks for; a `Signal` is a reply that
raises in the body; the control-flow exceptions unwind a body or the forward pass; and
`MediatorState` lists the states a mediator goes through, with the only transitions allowed
between them. How these are used is described in `_interleaver.py`. This module owns no state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INPUT, OUTPUT = 0, 1
KIND_NAMES = ("input", "output")

#: A boundary of the forward pass: (site, INPUT or OUTPUT, call number).
Key = tuple[int, int, int]

#: Put into the model thread's inbox by the SIGINT handler (`_interrupts.py`).
SIGINT = object()

# What a blocked mediator waits for (`Request.kind`).
VALUE, BARRIER, NAME, STEP, RESULT = "VALUE", "BARRIER", "NAME", "STEP", "RESULT"


@dataclass(slots=True)
class Request:
    """What a blocked mediator waits for."""

    kind: str
    target: Any  # Key for VALUE, Barrier for BARRIER, a name for NAME, a step for STEP


@dataclass(slots=True)
class Op:
    """A request that needs no answer: a swap or a skip, applied when the model reaches `key`."""

    key: Key
    apply: Callable[[Any], Any] | None  # swap: new view from old view; None for a skip
    skip_value: Any
    where: str  # the user's file and line, for late errors


@dataclass(slots=True)
class Signal:
    """A reply that makes the blocked request raise `error` in the body."""

    error: BaseException


class MediatorState(enum.IntEnum):
    """Where a mediator is in its life. Only the thread holding the baton changes a state (a
    worker changes its own when it receives the baton), always through `Mediator.enter_state`,
    which checks the transition against `TRANSITIONS`. (An IntEnum: hashing one is cheap.)"""

    CREATED = 0  # built; no thread runs it yet
    STARTING = 1  # handed to a worker with the baton; the body has not begun
    RUNNING = 2  # holds the baton and runs its body
    BLOCKED = 3  # waits in its inbox for a reply; `waiting` says for what
    DONE = 4  # the body returned or raised (`result` or `error`), or had nothing to run
    CANCELLED = 5  # ended by the trace's cancellation, or never started


TRANSITIONS: dict[MediatorState, frozenset[MediatorState]] = {
    MediatorState.CREATED: frozenset(
        {MediatorState.STARTING, MediatorState.DONE, MediatorState.CANCELLED}
    ),
    MediatorState.STARTING: frozenset(
        {MediatorState.RUNNING, MediatorState.DONE, MediatorState.CANCELLED}
    ),
    MediatorState.RUNNING: frozenset(
        {MediatorState.BLOCKED, MediatorState.DONE, MediatorState.CANCELLED}
    ),
    MediatorState.BLOCKED: frozenset({MediatorState.RUNNING}),
    MediatorState.DONE: frozenset(),
    MediatorState.CANCELLED: frozenset(),
}


class TraceState(enum.Enum):
    """Where a trace is in its life: collecting invokes, running once, then closed."""

    OPEN = "open"
    RUNNING = "running"
    CLOSED = "closed"


# -- control flow: never seen by users -------------------------------------------------------


class Cancelled(BaseException):
    """Raised inside a body to unwind it when its trace ends early."""


class BodyStopped(BaseException):
    """Raised by `tr.stop()` in its body: the body ends there, as with `return`."""


class LoopEnd(BaseException):
    """Ends an open `tr.iter[a:]` loop: the traced call returned before the next step."""


class StopForward(BaseException):
    """Unwinds the forward pass after `tr.stop()`."""


class Abort(BaseException):
    """Unwinds the forward pass when the trace must end (a body or the library failed)."""


class SkipBody(BaseException):
    """Raised on the first line of a with-block body so the caller does not run it itself."""
