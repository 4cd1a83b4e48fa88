"""One tensor's rows along its batch dimension: cutting, scaling, writing back, joining.

The Batcher walks a value's leaves (`_batcher.py`); for each tensor it uses these, given the
leaf's batch dim (`_layouts.Dims`), the total batch size, the rows of one invoke and the known
expansions of the batch (`expand`: a tensor with `f * total` rows holds `f` rows per batch row,
those of batch row i at `[i * f, (i + 1) * f)`). This module owns no state.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ._errors import RowlessValueWarning, ShapeError
from ._layouts import Dims
from ._tree import describe, same_tensor


def without(tensor: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The shape of `tensor` without its dimension `dim`."""
    shape = tuple(tensor.shape)
    return shape[:dim] + shape[dim + 1 :]


def dim_at(dims: Dims, position: int, value: Any) -> int | None:
    """The batch dim of tensor leaf number `position` of `value` under `dims`; raises
    ShapeError where `dims` says the rows cannot be told."""
    if dims is None:
        return 0
    if isinstance(dims, str):
        raise ShapeError(f"{dims}. The value: {describe(value)}")
    return dims[position] if position < len(dims) else dims[-1]


def rows_factor(
    leaf: torch.Tensor, dim: int | None, total: int, expand: tuple[int, ...], declared: bool
) -> int | None:
    """How many rows `leaf` has per batch row along `dim`: 1, a factor of `expand`, or None
    (no rows; a ShapeError where its batch dim is `declared`)."""
    if dim is None:
        return None
    if leaf.dim() > dim:
        size = leaf.shape[dim]
        if size == total:
            return 1
        for factor in expand:
            if size == total * factor:
                return factor
    if declared:
        sizes = " or ".join(str(total * f) for f in (1, *expand))
        raise ShapeError(
            f"{describe(leaf)} should hold the batch on dim {dim} ({sizes} rows), but does not; "
            "declare where its rows are: mediator.Batcher(batch_dims={path: ...})"
        )
    return None


def scaled(rows: slice, factor: int) -> slice:
    return rows if factor == 1 else slice(rows.start * factor, rows.stop * factor)


def is_batch(leaf: Any, total: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == total


def narrow_leaf(leaf: Any, rows: slice, total: int) -> Any:
    if is_batch(leaf, total):
        return leaf if rows.stop - rows.start == total else leaf[rows]
    if isinstance(leaf, torch.Tensor) and leaf.dim() == 0:
        warn_rowless(leaf, rows, total)
    return leaf


def warn_rowless(leaf: torch.Tensor, rows: slice, total: int) -> None:
    """Warn that the invoke of `rows` is handed `leaf`, a value of the whole batch."""
    warnings.warn(
        f"the invoke of rows {rows.start}:{rows.stop} (of {total}) reads a value with no batch "
        f"rows, {describe(leaf)} (a batch-reduced scalar such as a loss): it is computed from "
        "every invoke's rows, not this invoke's own. Compute it from this invoke's own rows "
        "(e.g. a loss from its logits), read it in an invoke without inputs (tr.invoke()), "
        "which sees the whole batch, or trace the invoke alone",
        RowlessValueWarning,
        stacklevel=2,
    )


def narrow_along(
    leaf: torch.Tensor,
    dim: int | None,
    rows: slice,
    total: int,
    expand: tuple[int, ...],
    declared: bool,
    in_cache: bool = False,
) -> torch.Tensor:
    """`leaf`'s rows `rows` along its batch dim `dim` (scaled by its expansion), a view. A 0-dim
    leaf warns (`RowlessValueWarning`), unless it is a cache's own bookkeeping (`in_cache`)."""
    factor = rows_factor(leaf, dim, total, expand, declared)
    if factor is None or dim is None:
        if dim is not None and leaf.dim() == 0 and not in_cache:
            warn_rowless(leaf, rows, total)
        return leaf
    if rows.stop - rows.start == total:  # every row: the tensor itself (no view, no merge)
        return leaf
    own = scaled(rows, factor)
    return leaf[own] if dim == 0 else leaf.narrow(dim, own.start, own.stop - own.start)


def merge_cached(
    rows: slice, total: int, expand: tuple[int, ...], full: torch.Tensor, view: torch.Tensor
) -> torch.Tensor:
    """One tensor of a cache after an invoke's view of it: `full` where the view still is its
    rows of `full` (edits landed in place), else `full` with the view written over its rows."""
    factor = rows_factor(full, 0, total, expand, False)
    if factor is None:
        return view
    own = scaled(rows, factor)
    if view.is_set_to(full[own]):  # the same memory: storage, offset, shape and strides
        return full
    return torch.slice_scatter(full, view, 0, own.start, own.stop)


def join_leaves(column: tuple[Any, ...], parts: list[tuple[slice, Any]], dim: int) -> Any:
    """One leaf of `Batcher.join` from the parts' leaves at one position."""
    first = column[0]
    if not isinstance(first, torch.Tensor):
        return first
    sizes = [rows.stop - rows.start for rows, _ in parts]

    def batched(leaf: torch.Tensor, size: int) -> bool:
        return leaf.dim() > dim and leaf.shape[dim] == size

    if not all(batched(leaf, size) for leaf, size in zip(column, sizes, strict=True)):
        if all(leaf.shape == first.shape for leaf in column):
            for leaf, (rows, _) in zip(column[1:], parts[1:], strict=False):
                if not same_tensor(leaf, first):
                    raise ShapeError(
                        f"the value for rows {rows.start}:{rows.stop} holds {describe(leaf)}, "
                        "a value without rows (every invoke shares it whole), unlike the one "
                        f"for rows {parts[0][0].start}:{parts[0][0].stop}: the skip values of "
                        "the invokes must agree on it"
                    )
            return first  # not batched: every invoke's view holds it whole
    trailing = (without(first, dim) if first.dim() > dim else (), first.dtype, first.device)
    for leaf, size, (rows, _) in zip(column, sizes, parts, strict=True):
        part = f"the value for rows {rows.start}:{rows.stop}"
        if not batched(leaf, size):
            raise ShapeError(
                f"{part} holds {describe(leaf)}; its batch dimension (dim {dim}) must be the "
                f"invoke's number of rows, {size}"
            )
        if (without(leaf, dim), leaf.dtype, leaf.device) != trailing:
            first_rows = parts[0][0]
            raise ShapeError(
                f"{part} holds {describe(leaf)} and the one for rows {first_rows.start}:"
                f"{first_rows.stop} {describe(first)}; they must agree in every dimension but "
                f"the batch dimension (dim {dim}), in dtype and in device"
            )
    return torch.cat(column, dim=dim)


def merge_rows(leaf: torch.Tensor, views: list[tuple[slice, Any]], dim: int) -> Any:
    """A new tensor: `leaf` with each `(rows, view)` written over its rows along `dim` (out of
    place)."""
    if len(views) == 1:
        rows, view = views[0]
        if view.shape == leaf.shape:  # the invoke holds every row: its view is the value
            return view
        return torch.slice_scatter(leaf, view, dim, rows.start, rows.stop)
    parts = []
    covered = 0
    for rows, view in views:
        if rows.start > covered:
            parts.append(leaf.narrow(dim, covered, rows.start - covered))
        parts.append(view)
        covered = rows.stop
    if covered < leaf.shape[dim]:
        parts.append(leaf.narrow(dim, covered, leaf.shape[dim] - covered))
    return torch.cat(parts, dim=dim)
