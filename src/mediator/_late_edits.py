"""Reporting in-place edits that came too late to matter (`LateEditWarning`), and the warning
for bodies cut short by `tr.stop()` (`StoppedWarning`), both issued as the trace ends.

`.output` hands a body the real tensor, so an in-place edit changes what the model computes
with, but only while the model stands at that boundary. A `LateEditWatch` belongs to one
mediator and holds, weakly, the tensors it was handed at a boundary the model passed while the
body waited, with their version counters as of when the body got the baton back. One that
changed in place before the body hands the baton on again was edited too late. Each value is
watched for that one stretch, so a handoff costs what it carried, not every value read so far.
The owning mediator's thread is the only one that touches the watch, except `keep`, which the
model thread calls while it holds the baton.

Where the edit was: no line is traced. Each time the body gets the baton back with values
watched, the watch notes only the instruction offset in the body's own frame (found once per
body); a late edit found at the next request is reported as made between that line, where the
model moved on, and the line of the request.
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ._callsite import outer_user_frame, user_line
from ._errors import LateEditWarning, StoppedWarning
from ._protocol import Key
from ._tree import tensors

if TYPE_CHECKING:
    from ._boundary import Boundary


class LateEditWatch:
    """The values one body was handed at passed boundaries, and the late edits found."""

    __slots__ = ("past", "found", "frame", "since")

    def __init__(self) -> None:
        self.past: list[tuple[Key, weakref.ref[torch.Tensor], int]] = []
        # key, the body's line at the next request, the line where the model had moved on
        self.found: list[tuple[Key, tuple[str, int] | None, tuple[str, int] | None]] = []
        self.frame: types.FrameType | None = None  # the body's own frame, once looked up
        self.since = -1  # its instruction offset when the body last got the baton back

    def keep(self, key: Key, view: Any) -> None:
        """The boundary `key`, where the body was handed `view`, is over (model thread)."""
        for leaf in tensors(view):
            if not leaf.is_inference():
                self.past.append((key, weakref.ref(leaf), leaf._version))

    def snapshot(self) -> None:
        """The body gets the baton: what the model changed meanwhile is not the body's doing.
        Note where the body stands (its own frame is looked up the first time only)."""
        live = ((key, ref, ref()) for key, ref, _ in self.past)
        self.past = [(key, ref, leaf._version) for key, ref, leaf in live if leaf is not None]
        frame = self.frame
        if frame is None:
            frame = self.frame = outer_user_frame()
        self.since = -1 if frame is None else frame.f_lasti

    def check(self, current: Boundary | None, ended: bool) -> None:
        """Note the watched values the body changed in place since it got the baton, with its
        current line (none once it `ended`), and stop watching them. An edit of memory that the
        boundary the model stands at (`current`) shares is in time and is not reported."""
        shared: set[int | None] | None = None
        for key, ref, version in self.past:
            leaf = ref()
            if leaf is None or leaf._version == version:
                continue
            if shared is None:
                shared = _storages(current)
            storage = _storage(leaf)
            if storage is not None and storage not in shared:
                self.found.append((key, None if ended else user_line(), self._since_line()))
        self.past = []

    def _since_line(self) -> tuple[str, int] | None:
        """The file and line of the body's frame at offset `since`."""
        frame = self.frame
        if frame is None or self.since < 0:
            return None
        code = frame.f_code
        for start, end, line in code.co_lines():
            if start <= self.since < end and line is not None:
                return code.co_filename, line
        return None

    def clear(self) -> None:
        self.past = []
        self.found = []
        self.frame = None


def warn(
    what: str,
    where: tuple[str, int] | None,
    since: tuple[str, int] | None,
    frame: types.FrameType,
) -> None:
    """Issue the `LateEditWarning` for value `what`, attributed to the user's `where` (the
    body's next request; the trace's line in `frame` when the body had ended), saying that the
    edit was made after `since`, where the model moved on (when known)."""
    filename, line = where or (frame.f_code.co_filename, frame.f_lineno)
    span = ""
    if since is not None:
        end = "the end of the body" if where is None else f"{filename}:{line}"
        span = f" (edited between {since[0]}:{since[1]}, where the model moved on, and {end})"
    warnings.warn_explicit(
        f"{what} was changed in place after the model had already used it{span}, so the change "
        "has no effect on this forward pass. Edit a value right after reading it, before asking "
        "for anything the model computes later (or waiting for another invoke's name); .clone() "
        "a value you want to change for your own use",
        LateEditWarning,
        filename,
        line,
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )


def warn_stopped(message: str, where: tuple[str, int], frame: types.FrameType) -> None:
    """Issue a `StoppedWarning` (a body cut short by `tr.stop()`), attributed to `where`."""
    filename, line = where
    warnings.warn_explicit(
        message,
        StoppedWarning,
        filename,
        line,
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )


def _storages(boundary: Boundary | None) -> set[int | None]:
    """Where the tensors of `boundary` (its value and every invoke's view) keep their data."""
    if boundary is None:
        return set()
    values = [boundary.value, *boundary.views.values()]
    return {_storage(leaf) for value in values for leaf in tensors(value)}


def _storage(tensor: torch.Tensor) -> int | None:
    """Where `tensor` keeps its data; None where torch does not say (sparse and other layouts
    without one storage), and such a tensor is never reported."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None
