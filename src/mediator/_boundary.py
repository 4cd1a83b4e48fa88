"""The boundary the model thread stands at: its value, and each invoke's view of it.

A Boundary lives while the model thread serves one module input or output. Each invoke sees its
own rows (`view`, the same object on every read; along the batch dims of the site, `_layouts.py`,
scaled by the interleaver's `expand`); a swap replaces that view, its tensors moved to the
device and dtype of those they replace (`_devices.py`), after a shape check; `merged` writes every
invoke's view back into the full value, without in-place writes, so that autograd sees each view
on the path from input to loss. A tensor with no rows (the whole batch's, handed to every invoke)
cannot be written by one invoke of several without reaching the others: a swap of it raises
`ShapeError` at once, an in-place edit when the boundary has been served (`check_shared`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ._batcher import merge_with, narrow_with
from ._devices import conform
from ._errors import ShapeError
from ._tree import describe, leaves, same_tensor

if TYPE_CHECKING:
    from ._interleaver import Interleaver
    from ._layouts import Dims
    from ._mediator import Mediator
    from ._protocol import Key

_MISSING = object()


class Boundary:
    """The value at the boundary the model thread stands at, and each invoke's view of it."""

    __slots__ = ("interleaver", "key", "value", "views", "dirty", "skips", "handed", "shared")

    def __init__(self, interleaver: Interleaver, key: Key, value: Any) -> None:
        self.interleaver = interleaver
        self.key = key
        self.value = value
        self.views: dict[Mediator, Any] = {}
        self.dirty = False  # views must be merged back into `value`
        self.skips: dict[Mediator, tuple[Any, str]] = {}  # value, and the user's line
        self.handed: list[tuple[Mediator, Any]] = []  # the views given out, for late edits
        # tensors without rows handed whole to an invoke of several, with their versions
        self.shared: list[tuple[Mediator, torch.Tensor, int]] = []

    def view(self, mediator: Mediator) -> Any:
        """What `mediator` sees here: its rows of the value (the same object on every read)."""
        view = self.views.get(mediator, _MISSING)
        if view is not _MISSING:
            return view
        il = self.interleaver
        if mediator.rows is None:
            view = self.value = self.merged()
        else:
            site, kind, _ = self.key
            dims = il.dims[kind][site]
            if dims is None and not il.expand:  # the default rule: nothing can fail
                view = il.batcher.narrow(self.value, mediator.rows, il.total)
            else:
                view = self._narrow_by_layout(mediator, mediator.rows, dims)
            view_leaves = leaves(view)
            if torch.is_grad_enabled() and any(
                isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in view_leaves
            ):
                self.dirty = True  # so the rest of the forward computes from this very view
            if self._one_of_several(mediator):
                shared = _shared(self.value, view, view_leaves)
                self.shared.extend((mediator, t, t._version) for _, t in shared)
        self.views[mediator] = view
        self.handed.append((mediator, view))
        return view

    def _narrow_by_layout(self, mediator: Mediator, rows: slice, dims: Dims) -> Any:
        """`mediator`'s `rows` along the site's batch dims; a ShapeError names the boundary."""
        il = self.interleaver
        try:
            return narrow_with(il.batcher, self.value, rows, il.total, dims, il.expand)
        except ShapeError as error:
            where = self.describe(mediator)
            raise ShapeError(f"{where}, read by {mediator.label()}: {error}") from None

    def swap(self, mediator: Mediator, apply: Callable[[Any], Any], where: str) -> None:
        """Replace `mediator`'s view by `apply(view)`, its tensors moved to the device and dtype
        of those they replace (`_devices.conform`); raises ShapeError if it does not fit."""
        old = self.view(mediator)
        where = f"{self.describe(mediator)} at {where}"
        new = conform(old, apply(old), where)
        self.interleaver.batcher.check_replacement(old, new, where)
        if mediator.rows is None:
            self.value = new
            self.views = {mediator: new}
            self.dirty = False
        else:
            shared = _shared(self.value, old, leaves(old)) if self._one_of_several(mediator) else []
            new_leaves = leaves(new)
            for position, tensor in shared:
                kept = new_leaves[position]
                if not same_tensor(kept, tensor):  # a replacement keeping its values is no write
                    raise ShapeError(self._shared_write(mediator, tensor, f"replaced at {where}"))
            self.views[mediator] = new
            self.dirty = True

    def _one_of_several(self, mediator: Mediator) -> bool:
        """Whether `mediator` (which has inputs) holds only some of the rows: a tensor it is
        handed whole is then shared with other invokes. One that holds every row owns its value
        (the tensors of its view are the value's own)."""
        rows: slice | None = mediator.rows
        assert rows is not None
        held: int = rows.stop - rows.start
        return held < self.interleaver.total

    def merged(self) -> Any:
        """The full value with every invoke's edits written back."""
        if self.dirty:
            il = self.interleaver
            views = sorted(
                ((m.rows, v) for m, v in self.views.items() if m.rows is not None),
                key=lambda item: item[0].start,
            )
            site, kind, _ = self.key
            try:
                self.value = merge_with(
                    il.batcher, self.value, views, il.total, il.dims[kind][site], il.expand
                )
            except ShapeError as error:
                raise ShapeError(f"{self.describe()}: {error}") from None
            self.dirty = False
        return self.value

    def check_shared(self) -> None:
        """Raise ShapeError if an invoke edited in place a tensor without rows it was handed
        (the boundary has been served: the edit reached every invoke). An invoke without inputs
        that was served here may edit it (it owns the whole batch): then nobody is blamed."""
        if any(mediator.rows is None for mediator in self.views):
            return
        for mediator, tensor, version in self.shared:
            if tensor._version != version:
                raise ShapeError(self._shared_write(mediator, tensor, "edited in place"))

    def _shared_write(self, mediator: Mediator, tensor: torch.Tensor, how: str) -> str:
        where = self.describe(mediator)
        return (
            f"{where}: {mediator.label()} {how} {describe(tensor)}, a value without "
            f"rows of its own (not batched along the batch dim of {self.interleaver.total} rows "
            "the library knows for it): every invoke is handed it whole, so the write would "
            "reach the other invokes too. Write it from an invoke without inputs (tr.invoke()), "
            "which owns the whole batch, trace this invoke alone, or declare where its rows "
            "are with mediator.Batcher(batch_dims={path: ...})"
        )

    def describe(self, by: Mediator | None = None) -> str:
        return self.interleaver.describe(self.key, by)


def _shared(full: Any, view: Any, view_leaves: list[Any]) -> list[tuple[int, torch.Tensor]]:
    """The tensors of an invoke's `view` (whose leaves are `view_leaves`) that are the full
    value's own (not cut to its rows), with their position among the value's leaves."""
    if isinstance(view, torch.Tensor):
        return [(0, view)] if view is full else []
    full_leaves = leaves(full)
    return [
        (position, leaf)
        for position, (leaf, whole) in enumerate(zip(view_leaves, full_leaves, strict=False))
        if leaf is whole and isinstance(leaf, torch.Tensor)
    ]
