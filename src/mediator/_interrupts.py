"""Ctrl-C during a trace: SIGINT routed to the trace that runs on the main thread.

A `KeyboardInterrupt` raised at an arbitrary point of the model thread could land in the middle
of a baton handoff. So while a trace runs on the main thread, and SIGINT has Python's default
handler, the handler is ours. Where the main thread runs model code (the innermost frame of this
package on its stack is a `model_call_site`, calling the model, a module's own forward or user
hooks) it raises `KeyboardInterrupt` there, as Python would. Anywhere else, in the library's own
steps or waiting for a body, it marks the innermost such trace `interrupted` and puts `SIGINT`
into its inbox, which wakes the model thread where it waits; the interleaver then raises
`KeyboardInterrupt` at a point of its own choosing (`Interleaver._wait_for_baton`, `call`). The
state is the stack of traces running on the main thread (nested ones push), the handler that was
there before the outermost one (put back when it ends), the set of model call sites, and the
main thread's id (the forking thread's in a child process).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # the C module: no enum conversions per trace
import os
import signal
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ._callsite import PACKAGE_DIR
from ._protocol import SIGINT

if TYPE_CHECKING:
    from ._interleaver import Interleaver

_stack: list[Interleaver] = []
_previous: Any = None
_model_call_sites: set[types.CodeType] = set()
_main_ident = threading.main_thread().ident  # after a fork: the forking thread's


def _after_fork_in_child() -> None:
    global _main_ident
    _main_ident = threading.get_ident()


Function = TypeVar("Function", bound=Callable[..., Any])


def model_call_site(function: Function) -> Function:
    """Mark `function` as one whose calls out of this package run model code, which a Ctrl-C
    may interrupt at once."""
    _model_call_sites.add(function.__code__)
    return function


def route_sigint(interleaver: Interleaver) -> bool:
    """From now on SIGINT interrupts `interleaver`, when called on the main thread while SIGINT
    has Python's default handler (or is routed to an outer trace already); otherwise nothing
    changes. Returns whether it routed: then `unroute_sigint()` must follow."""
    global _previous
    if threading.get_ident() != _main_ident:
        return False
    if not _stack:
        if _signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return False
        _previous = _signal.signal(signal.SIGINT, _handle)
    _stack.append(interleaver)
    return True


def unroute_sigint() -> None:
    """Undo the last `route_sigint` that routed: SIGINT goes to the outer trace, or to the
    handler from before the outermost one."""
    global _previous
    _stack.pop()
    if not _stack:
        _signal.signal(signal.SIGINT, _previous)
        _previous = None


def _handle(signum: int, frame: types.FrameType | None) -> None:
    if not _stack:  # the trace ended between the signal and this handler
        signal.default_int_handler(signum, frame)
        return
    if _in_model_code(frame):
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt here
        return
    interleaver = _stack[-1]
    interleaver.interrupted = True
    interleaver.inbox.put(SIGINT)


def _in_model_code(frame: types.FrameType | None) -> bool:
    """Whether the innermost frame of this package below `frame` is a model call site."""
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(PACKAGE_DIR):
            return code in _model_call_sites
        frame = frame.f_back
    return False


os.register_at_fork(after_in_child=_after_fork_in_child)
