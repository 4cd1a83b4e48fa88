"""Reporting in-place edits that came too late to matter (`LateEditWarning`).

`.output` hands a body the real tensor, so an in-place edit changes what the model computes
with, but only while the model stands at that boundary. A `LateEditWatch` belongs to one
mediator and holds, weakly, the tensors it was handed at a boundary the model passed while the
body waited, with their version counters as of when the body got the baton back. One that
changed in place before the body hands the baton on again was edited too late. Each value is
watched for that one stretch, so a handoff costs what it carried, not every value read so far.
The owning mediator's thread is the only one that touches the watch, except `keep`, which the
model thread calls while it holds the baton.
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ._callsite import user_line
from ._errors import LateEditWarning
from ._protocol import Key
from ._tree import tensors

if TYPE_CHECKING:
    from ._boundary import Boundary


class LateEditWatch:
    """The values one body was handed at passed boundaries, and the late edits found."""

    __slots__ = ("past", "found")

    def __init__(self) -> None:
        self.past: list[tuple[Key, weakref.ref[torch.Tensor], int]] = []
        self.found: list[tuple[Key, tuple[str, int] | None]] = []  # key, the body's line

    def keep(self, key: Key, view: Any) -> None:
        """The boundary `key`, where the body was handed `view`, is over (model thread)."""
        for leaf in tensors(view):
            if not leaf.is_inference():
                self.past.append((key, weakref.ref(leaf), leaf._version))

    def snapshot(self) -> None:
        """The body gets the baton: what the model changed meanwhile is not the body's doing."""
        live = ((key, ref, ref()) for key, ref, _ in self.past)
        self.past = [(key, ref, leaf._version) for key, ref, leaf in live if leaf is not None]

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
                self.found.append((key, None if ended else user_line()))
        self.past = []

    def clear(self) -> None:
        self.past = []
        self.found = []


def warn(what: str, where: tuple[str, int], frame: types.FrameType) -> None:
    """Issue the `LateEditWarning` for value `what`, attributed to the user's `where`."""
    filename, line = where
    warnings.warn_explicit(
        f"{what} was changed in place after the model had already used it, so the change has "
        "no effect on this forward pass. Edit a value right after reading it, before asking for "
        "anything the model computes later (or waiting for another invoke's name); .clone() a "
        "value you want to change for your own use",
        LateEditWarning,
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
