"""Which mediator runs on the calling thread.

A worker thread runs one body at a time; while it does, `current()` is that body's mediator, so
an Envoy, `tr.iter`, `tr.stop()` or a barrier knows whose request it makes. The state is one
thread-local slot, set by the worker as the body starts and cleared when it ends; threads that
run no body (the model thread, the user's own threads) have none.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._errors import UsageError

if TYPE_CHECKING:
    from ._mediator import Mediator

_local = threading.local()


def current() -> Mediator | None:
    """The mediator whose body runs on this thread, or None."""
    return _local.__dict__.get("mediator")


def set_current(mediator: Mediator | None) -> None:
    """Make `mediator` the calling thread's (None: the thread runs no body any more)."""
    _local.mediator = mediator


def require(what: str) -> Mediator:
    """The mediator whose body runs on this thread; `UsageError` outside any invoke body.
    `what` names the thing used, for the message."""
    mediator = current()
    if mediator is None:
        raise UsageError(
            f"{what} can only be used inside an invoke body (the code under "
            "`with model.trace(x):` or `with tr.invoke(x):`, or a function passed to "
            "`tr.invoke(x).run(fn)`); outside a trace, call the model or module directly"
        )
    return mediator
