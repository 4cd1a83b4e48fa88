"""Reading and writing the names of the frame that holds a `with` block, and skipping its body.

A with-body runs as a function in a mediator thread, so the names it uses come from the caller's
frame and the names it binds go back there when the trace ends: at module level (and in class
bodies, IPython cells) through the namespace dict; in functions through the fast locals, which
Python 3.13 (PEP 667) writes through `frame.f_locals` and 3.10-3.12 write through
`PyFrame_LocalsToFast` from the `f_locals` snapshot; a name the body deleted is written as
`UNBOUND` and unbound (3.12+ cannot unbind a function's local: `check_unbinding` refuses
such a `del` before the trace runs). Reading `f_locals` there fills the snapshot
with every local of the function; we empty it again (the next `locals()` refills it), so it keeps
no activation alive after the user deletes a name.

The caller must not run the body itself: `skip_body` makes the body's first line raise
`SkipBody`, which the `with` statement's `__exit__` swallows. Tracing functions are per thread
and shared with debuggers and coverage tools, so whatever was installed before is restored.
"""

from __future__ import annotations

import ctypes
import inspect
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import UsageError
from ._protocol import SkipBody

_PEP_667 = sys.version_info >= (3, 13)


def _optimized(frame: types.FrameType) -> bool:
    return bool(frame.f_code.co_flags & inspect.CO_OPTIMIZED)


def read_names(frame: types.FrameType, names: Iterable[str]) -> dict[str, Any]:
    """The values of those `names` that are bound in `frame`'s local scope."""
    scope = frame.f_locals
    found = {name: scope[name] for name in names if name in scope}
    if _optimized(frame) and not _PEP_667:
        scope.clear()  # the snapshot we just filled would keep every local alive
    return found


def check_unbinding(
    frame: types.FrameType, deletes: Iterable[tuple[str, int]], bound: dict[str, Any]
) -> None:
    """Raise `UsageError` if a body's `del name` (with its line) would have to unbind a name
    that `frame` has `bound`, where this Python cannot: a function's local on 3.12+."""
    if not _optimized(frame) or sys.version_info < (3, 12):
        return
    for name, line in deletes:
        if name in bound:
            raise UsageError(
                f"`del {name}` at {frame.f_code.co_filename}:{line} cannot unbind `{name}`, "
                "a local of the function around the with-body, on Python 3.12+ (CPython has no "
                f"way to unbind a function's local from outside it): write `del {name}` after "
                "the `with` block"
            )


#: The value `write_names` takes for a name to unbind, as `del name` would.
UNBOUND: Any = object()


def write_names(frame: types.FrameType, values: dict[str, Any]) -> None:
    """Bind `values` in `frame`'s local scope, as if the frame had assigned them (and unbind
    those given as `UNBOUND`, if bound)."""
    if not values:
        return
    scope = frame.f_locals
    if not _optimized(frame) or _PEP_667:
        for name, value in values.items():
            if value is not UNBOUND:
                scope[name] = value
            elif name in scope:
                del scope[name]
        return
    scope.update(values)
    unbind = [name for name, value in values.items() if value is UNBOUND]
    for name in unbind:
        del scope[name]
    clear = ctypes.c_int(1 if unbind else 0)  # 1: locals missing from the snapshot are unbound
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), clear)
    scope.clear()


class BodySkipper:
    """Makes `frame`, which is entering a `with` statement, raise `SkipBody` at its next
    instruction (the one right after the context manager's `__enter__` returned: it binds the
    `as` target or drops the value, inside the with statement's own protected range and before
    anything the body opens, such as a `try`); the statement's `__exit__` swallows it, so the
    body does not run in the caller. `restore()` puts the thread's and the frame's tracing back
    as they were.

    The trace function is a small object rather than a closure: a closure that returns itself is
    a reference cycle, which would leave garbage for the cycle collector after every trace.
    """

    def __init__(self, frame: types.FrameType) -> None:
        self.frame = frame
        self.previous_global = sys.gettrace()
        self.previous_local = frame.f_trace
        self.previous_opcodes = frame.f_trace_opcodes
        self.active = True
        frame.f_trace_opcodes = True
        frame.f_trace = _SKIP_AT_NEXT_INSTRUCTION
        sys.settrace(_ChainGlobal(self.previous_global))

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        sys.settrace(self.previous_global)
        self.frame.f_trace = self.previous_local
        self.frame.f_trace_opcodes = self.previous_opcodes
        self.frame = None  # type: ignore[assignment]


class _SkipAtNextInstruction:
    """Local trace function: raise `SkipBody` at the next instruction event."""

    __slots__ = ()

    def __call__(self, traced: types.FrameType, event: str, arg: Any) -> _SkipAtNextInstruction:
        if event == "opcode":
            raise SkipBody
        return self


_SKIP_AT_NEXT_INSTRUCTION = _SkipAtNextInstruction()


class _ChainGlobal:
    """Global trace function while a body is skipped: whatever was installed before keeps
    tracing new frames (a debugger's, a coverage tool's); without one, nothing is traced."""

    __slots__ = ("previous",)

    def __init__(self, previous: Callable[..., Any] | None) -> None:
        self.previous = previous

    def __call__(self, traced: types.FrameType, event: Any, arg: Any) -> Any:
        return self.previous(traced, event, arg) if self.previous else None
