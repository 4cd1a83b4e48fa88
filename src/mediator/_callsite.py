"""The user's side of a call stack: which line of theirs made a request, and tracebacks that
show their frames rather than the library's.

Every frame whose code lives in this package is library code; the first frame outside it is the
user's. This module owns no state.
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any

PACKAGE_DIR = os.path.dirname(__file__)


def user_frame() -> types.FrameType | None:
    """The innermost frame outside this package on the calling thread."""
    return first_user_frame(sys._getframe(1))


def first_user_frame(frame: types.FrameType | None) -> types.FrameType | None:
    """`frame` or the first frame below it (towards the caller) outside this package."""
    while frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
        frame = frame.f_back
    return frame


def outer_user_frame() -> types.FrameType | None:
    """The outermost frame of the user's code that called into this package on the calling
    thread (for a body: the body's own frame, below the library code that runs it)."""
    frame: Any = sys._getframe(1)
    outer = None
    while frame is not None:
        if not frame.f_code.co_filename.startswith(PACKAGE_DIR):
            outer = frame
        elif outer is not None:
            break
        frame = frame.f_back
    return outer


def user_line() -> tuple[str, int] | None:
    """The file and line of the user's code that called into this package."""
    frame = user_frame()
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


def user_location() -> str:
    """`file:line` of the user's code that called into this package, for messages."""
    where = user_line()
    return "?" if where is None else f"{where[0]}:{where[1]}"


def user_traceback(tb: types.TracebackType | None) -> types.TracebackType | None:
    """`tb` without the frames of this package: the user's own frames, in order."""
    kept = []
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = types.TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt
