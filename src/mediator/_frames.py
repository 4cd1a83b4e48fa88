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
    """Makes `frame` raise `SkipBody` when it reaches the body (its first line in
    `first..last`, or, for a body on the header's own line, its first instruction from column
    `column` on); `restore()` puts the thread's and the frame's tracing back as they were.

    The trace functions are small objects rather than closures: a closure that returns itself
    is a reference cycle, which would leave garbage for the cycle collector after every trace.
    """

    def __init__(
        self, frame: types.FrameType, first: int, last: int, column: int, inline: bool
    ) -> None:
        self.frame = frame
        self.previous_global = sys.gettrace()
        self.previous_local = frame.f_trace
        self.previous_opcodes = frame.f_trace_opcodes
        self.active = True
        if not inline:
            local: Callable[..., Any] = _SkipAtLine(first, last)
        else:
            if not hasattr(frame.f_code, "co_positions"):
                raise UsageError(
                    "on Python 3.10, put the body of a traced `with` block on its own line"
                )
            local = _SkipAtColumn(list(frame.f_code.co_positions()), first, column)
            frame.f_trace_opcodes = True
        frame.f_trace = local
        sys.settrace(_ChainGlobal(self.previous_global))

    def restore(self) -> None:
        if not self.active:
            return
        self.active = False
        sys.settrace(self.previous_global)
        self.frame.f_trace = self.previous_local
        self.frame.f_trace_opcodes = self.previous_opcodes
        self.frame = None  # type: ignore[assignment]


class _SkipAtLine:
    """Local trace function: raise `SkipBody` on the first line event inside the body."""

    __slots__ = ("first", "last")

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def __call__(self, traced: types.FrameType, event: str, arg: Any) -> _SkipAtLine:
        if event == "line" and self.first <= traced.f_lineno <= self.last:
            raise SkipBody
        return self


class _SkipAtColumn:
    """Local trace function: raise `SkipBody` at the first instruction of the body, on the
    header's line from `column` on (a body written on the `with` line itself)."""

    __slots__ = ("positions", "line", "column")

    def __init__(self, positions: list[Any], line: int, column: int) -> None:
        self.positions, self.line, self.column = positions, line, column

    def __call__(self, traced: types.FrameType, event: str, arg: Any) -> _SkipAtColumn:
        if event == "opcode":
            line, _, start, _ = self.positions[traced.f_lasti // 2]
            if line == self.line and start is not None and start >= self.column:
                raise SkipBody
        return self


class _ChainGlobal:
    """Global trace function while a body is skipped: whatever was installed before keeps
    tracing new frames (a debugger's, a coverage tool's); without one, nothing is traced."""

    __slots__ = ("previous",)

    def __init__(self, previous: Callable[..., Any] | None) -> None:
        self.previous = previous

    def __call__(self, traced: types.FrameType, event: Any, arg: Any) -> Any:
        return self.previous(traced, event, arg) if self.previous else None
