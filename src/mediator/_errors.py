"""The exceptions `mediator` raises, one class per kind of mistake.

Every error says what happened, where (module path, call) and what to do instead. User exceptions
raised inside a body are never wrapped: they reach the caller with their own type and traceback.
"""

from __future__ import annotations


class MediatorError(Exception):
    """Base class of every error raised by `mediator` itself."""


class UsageError(MediatorError, RuntimeError):
    """The API was used in a way it cannot work (outside a trace, invoke inside invoke, ...)."""


class OutOfOrderError(MediatorError):
    """A body asked for a value the model had already computed (or skipped past)."""


class MissedProviderError(MediatorError):
    """A body asked for a value the model never produced in this forward pass."""


class ShapeError(MediatorError, ValueError):
    """A swapped value or a batched input does not have the shape the model needs."""


class SourceUnavailableError(UsageError):
    """The source of a with-block body cannot be found (plain REPL, `exec` of a string)."""


class _Cancelled(BaseException):
    """Raised inside a body to unwind it when its trace ends early. Never reaches users."""


class _SkipBody(BaseException):
    """Raised on the first line of a with-block body so the caller does not run it itself."""


class _LoopEnd(BaseException):
    """Ends an open `tr.iter[a:]` loop: the traced call returned before the next step."""


class _Stop(BaseException):
    """Unwinds the forward pass after `tr.stop()`."""
