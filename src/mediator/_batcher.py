"""The Batcher: one batched forward for all invokes of a trace, and each invoke's view of it.

`batch` concatenates the invokes' inputs along dim 0 and gives each invoke its rows. `narrow`
cuts an invoke's rows out of any value met during the forward (every tensor whose dim 0 is the
total batch size; others pass whole). `merge` writes the invokes' edited rows back into the full
value without touching the original in place, so autograd sees every invoke's view on the path
from input to loss. `join` puts together a full value from the invokes' own values (when each
skips a call). Subclass it for models that need their own batching (padding, masks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ._errors import RowlessValueWarning, ShapeError, UsageError
from ._tree import describe, flatten

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


class Batcher:
    """Concatenates invokes' inputs along dim 0 and narrows values back to each invoke's rows.

    This is the default for models that are not causal language models. A model that needs its
    own batching (padding, masks, a batch dimension that is not first) gets a subclass through
    `mediator.Model(net, batcher=...)`; override `batch`, and `narrow`, `merge`, `join` and
    `check_replacement` where values are batched differently too.

    Example:

        class PadRight(mediator.Batcher):
            def batch(self, inputs, generate=False):
                width = max(entry[0][0].shape[1] for entry in inputs if entry is not None)
                padded = [
                    None if entry is None else ((pad_to(entry[0][0], width),), entry[1])
                    for entry in inputs
                ]
                return super().batch(padded, generate)

        model = mediator.Model(net, batcher=PadRight())
    """

    def batch(
        self, inputs: list[Inputs | None], generate: bool = False
    ) -> tuple[Inputs, list[slice | None], int]:
        """Batch the inputs of every invoke (None for an empty invoke); `generate` says whether
        they go to the module's `generate` rather than its forward.

        Returns the batched `(args, kwargs)`, each invoke's rows (`None` for "the whole batch")
        and the total batch size. Raises `UsageError` when no invoke has inputs, and
        `ShapeError` when the inputs cannot be concatenated.

        Example:

            batcher = mediator.Batcher()
            (args, kwargs), rows, total = batcher.batch([((x1,), {}), None, ((x2,), {})])
            # args == (torch.cat([x1, x2]),), kwargs == {}, total == len(x1) + len(x2)
            # rows == [slice(0, len(x1)), None, slice(len(x1), total)]
        """
        given = [(index, entry) for index, entry in enumerate(inputs) if entry is not None]
        if not given:
            raise UsageError(
                "no invoke of this trace has inputs: pass them to model.trace(x) or to "
                "tr.invoke(x) in at least one invoke"
            )
        if len(given) == 1:
            return given[0][1], [None] * len(inputs), self._rows_of(given[0][1], given[0][0])
        sizes = [self._rows_of(entry, index) for index, entry in given]
        rows: list[slice | None] = [None] * len(inputs)
        start = 0
        for (index, _), size in zip(given, sizes, strict=False):
            rows[index] = slice(start, start + size)
            start += size
        return self._concatenate([entry for _, entry in given], [i for i, _ in given]), rows, start

    def name_inputs(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Inputs:
        """An invoke's inputs as `batch` gets them, given `call`, the method the trace calls:
        as given here. `CausalLMBatcher` names positional inputs after the first by `call`'s
        parameters, so that a mask passed positionally is padded like one passed by keyword.

        Example:

            mediator.Batcher().name_inputs(net.forward, (x, mask), {})   # ((x, mask), {})
        """
        return args, kwargs

    def for_run(self, batched: Inputs) -> Batcher:
        """The batcher that narrows and merges the values of one run whose batched inputs are
        `batched`: this one. A subclass that needs something of the batch to narrow a value
        returns a batcher that keeps it (`CausalLMBatcher`: the labels, for each invoke's loss).

        Example:

            batched, rows, total = batcher.batch(inputs)
            run_batcher = batcher.for_run(batched)      # narrows this run's values
        """
        return self

    def narrow(self, value: Any, rows: slice, total: int) -> Any:
        """The part of `value` that belongs to `rows` (views, no copies).

        Every tensor in `value` (also inside tuples, lists, dicts and dataclasses) whose dim 0
        is `total` is cut to `rows`; other leaves are kept whole. A 0-dim tensor has no rows:
        handing it to one invoke of several warns (`RowlessValueWarning`).

        Example:

            h = torch.randn(3, 8)
            first = batcher.narrow(h, slice(0, 1), total=3)         # h[0:1], a view
            pair = batcher.narrow((h, mask), slice(1, 3), total=3)  # (h[1:3], mask[1:3])
        """
        if isinstance(value, torch.Tensor):
            return _narrow_leaf(value, rows, total)
        leaves, rebuild = flatten(value)
        return rebuild([_narrow_leaf(leaf, rows, total) for leaf in leaves])

    def merge(self, full: Any, views: list[tuple[slice, Any]], total: int) -> Any:
        """Rebuild `full` from each invoke's (possibly replaced) view of its rows.

        `views` lists `(rows, view)` for the invokes that hold a view, in row order.
        The result is a new value: `full` is not written to in place, so autograd sees every
        view on the path to the loss. Leaves that are not batched take an invoke's replacement.

        Example:

            h = torch.zeros(3, 8)
            new = batcher.merge(h, [(slice(0, 1), torch.ones(1, 8))], total=3)
            # new[0] is all ones, new[1:] all zeros; h is unchanged
        """
        if isinstance(full, torch.Tensor):
            return _merge_rows(full, views) if _is_batch(full, total) else full
        full_leaves, rebuild = flatten(full)
        view_leaves = [(rows, flatten(view)[0]) for rows, view in views]
        merged = []
        for position, leaf in enumerate(full_leaves):
            if _is_batch(leaf, total):
                merged.append(_merge_rows(leaf, [(rows, ls[position]) for rows, ls in view_leaves]))
            else:
                for _, leaves in view_leaves:
                    if leaves[position] is not full_leaves[position]:
                        leaf = leaves[position]
                merged.append(leaf)
        return rebuild(merged)

    def join(self, parts: list[tuple[slice, Any]], total: int) -> Any:
        """The full value made of the invokes' own values for their rows, the inverse of
        `narrow`: used for a call that every invoke skips (`.skip(v)`).

        `parts` lists `(rows, value)` in row order, covering all `total` rows. A tensor whose
        first dimension is its part's number of rows in every part is concatenated along dim 0;
        one of the same shape in every part is not batched (`narrow` hands it whole to every
        invoke), and it and the other leaves are taken from the first part. Raises `ShapeError`
        when the values differ in structure or a tensor fits neither case.

        Example:

            a, b = torch.zeros(1, 8), torch.ones(2, 8)
            h = batcher.join([(slice(0, 1), a), (slice(1, 3), b)], total=3)  # torch.cat([a, b])
        """
        flat = [flatten(value)[0] for _, value in parts]
        first_rows, first = parts[0]
        kinds = [isinstance(leaf, torch.Tensor) for leaf in flat[0]]
        for (rows, value), leaves in zip(parts, flat, strict=False):
            if (
                type(value) is not type(first)
                or [isinstance(leaf, torch.Tensor) for leaf in leaves] != kinds
            ):
                raise ShapeError(
                    f"the value for rows {rows.start}:{rows.stop} is {describe(value)} and the one "
                    f"for rows {first_rows.start}:{first_rows.stop} {describe(first)}; give every "
                    "invoke a value of the same structure"
                )
        return flatten(first)[1](
            [_join_leaves(column, parts) for column in zip(*flat, strict=True)]
        )

    def check_replacement(self, old: Any, new: Any, where: str) -> None:
        """Raise ShapeError unless `new` can stand where `old` stood (same structure, shapes,
        dtypes and devices of its tensors).

        Called for every `.output = v`, `.inputs = ...`, `.input = v` and `.skip(v)`; `where`
        names the module and the user's line in the error message.

        Example:

            h = torch.zeros(2, 8)
            batcher.check_replacement(h, h * 2, "layers.1.output")         # fine
            batcher.check_replacement(h, h[:, :4], "layers.1.output")      # ShapeError
        """
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
            if (old.shape, old.dtype, old.device) != (new.shape, new.dtype, new.device):
                raise ShapeError(
                    f"{where}: got {describe(new)}, expected {describe(old)}; a replacement "
                    "must match the shape, dtype and device of the value it replaces"
                )
            return
        old_leaves, _ = flatten(old)
        new_leaves, _ = flatten(new)
        if type(old) is not type(new) or len(old_leaves) != len(new_leaves):
            raise ShapeError(
                f"{where}: got {describe(new)}, expected {describe(old)} with "
                f"{len(old_leaves)} leaves; replace it with a value of the same structure"
            )
        for old_leaf, new_leaf in zip(old_leaves, new_leaves, strict=False):
            if isinstance(old_leaf, torch.Tensor):
                self.check_replacement(old_leaf, new_leaf, where)

    def _rows_of(self, entry: Inputs, index: int) -> int:
        args = entry[0]
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
            return int(args[0].shape[0])
        for leaf in _leaves(entry, list(entry[1])):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                return int(leaf.shape[0])
        raise UsageError(
            f"invoke {index} has inputs but no tensor among them: the batch size is the first "
            "dimension of the first tensor input"
        )

    def _concatenate(self, entries: list[Inputs], indices: list[int]) -> Inputs:
        first_args, first_kwargs = entries[0]
        for entry, index in zip(entries[1:], indices[1:], strict=False):
            args, kwargs = entry
            if len(args) != len(first_args) or set(kwargs) != set(first_kwargs):
                raise ShapeError(
                    f"cannot batch invoke {index} with invoke {indices[0]}: they pass different "
                    f"inputs ({_signature(entry)} vs {_signature(entries[0])}); every invoke "
                    "must pass the same positional and keyword inputs",
                    invokes=(indices[0], index),
                )
        keys = list(first_kwargs)
        columns = list(zip(*(_leaves(entry, keys) for entry in entries), strict=False))
        batched = [
            self._concatenate_column(column, indices, partial(_leaf_name, entries[0], keys, i))
            for i, column in enumerate(columns)
        ]
        if not keys and all(type(arg) is torch.Tensor for arg in first_args):
            return tuple(batched), {}
        _, rebuild = flatten((first_args, first_kwargs))
        args, kwargs = rebuild(batched)
        return tuple(args), dict(kwargs)

    def _concatenate_column(
        self, values: tuple[Any, ...], indices: list[int], name_of: Callable[[], str]
    ) -> Any:
        first = values[0]
        if not isinstance(first, torch.Tensor):
            for value, index in zip(values[1:], indices[1:], strict=False):
                if isinstance(value, torch.Tensor) or value != first:
                    raise ShapeError(
                        f"cannot batch {name_of()}: invoke {indices[0]} passes {first!r} and "
                        f"invoke {index} passes {value!r}; inputs that are not tensors must be "
                        "equal",
                        invokes=(indices[0], index),
                    )
            return first
        dtype = first.dtype  # torch.cat would promote mixed dtypes silently: check them first
        if all(type(value) is torch.Tensor and value.dtype is dtype for value in values):
            try:
                return torch.cat(values, dim=0)
            except RuntimeError:
                pass  # shapes, dimensions or devices differ: explain which invoke's below
        trailing = (first.shape[1:], first.dtype, first.device)
        for value, index in zip(values, indices, strict=False):
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                raise ShapeError(
                    f"cannot batch {name_of()}: invoke {index} passes {describe(value)}; batched "
                    "inputs must be tensors with a batch dimension first",
                    invokes=(index,),
                )
            if (value.shape[1:], value.dtype, value.device) != trailing:
                raise ShapeError(
                    f"cannot batch {name_of()}: invoke {indices[0]} passes {describe(first)} and "
                    f"invoke {index} passes {describe(value)}; all dimensions but the first, "
                    "the dtype and the device must agree (pad to one length, or trace them "
                    "separately)",
                    invokes=(indices[0], index),
                )
        return torch.cat(values, dim=0)


def _leaves(entry: Inputs, keys: list[str]) -> list[Any]:
    """The leaves of an invoke's inputs: positional arguments, then keywords in `keys` order."""
    args, kwargs = entry
    leaves: list[Any] = []
    for arg in args:
        if type(arg) is torch.Tensor:
            leaves.append(arg)
        else:
            leaves.extend(flatten(arg)[0])
    for key in keys:
        leaves.extend(flatten(kwargs[key])[0])
    return leaves


def _leaf_name(entry: Inputs, keys: list[str], position: int) -> str:
    """How an error names leaf number `position` of `_leaves(entry, keys)`."""
    args, kwargs = entry
    names = [f"input {i}" for i, arg in enumerate(args) for _ in flatten(arg)[0]]
    names += [f"input {key!r}" for key in keys for _ in flatten(kwargs[key])[0]]
    return names[position]


def _signature(entry: Inputs) -> str:
    args, kwargs = entry
    return f"{len(args)} positional, keywords {sorted(kwargs)}"


def _is_batch(leaf: Any, total: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == total


def _narrow_leaf(leaf: Any, rows: slice, total: int) -> Any:
    if _is_batch(leaf, total):
        return leaf[rows]
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


def _join_leaves(column: tuple[Any, ...], parts: list[tuple[slice, Any]]) -> Any:
    """One leaf of `Batcher.join` from the parts' leaves at one position."""
    first = column[0]
    if not isinstance(first, torch.Tensor):
        return first
    sizes = [rows.stop - rows.start for rows, _ in parts]
    batched = all(_is_batch(leaf, size) for leaf, size in zip(column, sizes, strict=True))
    if not batched and all(leaf.shape == first.shape for leaf in column):
        return first  # not batched: every invoke's view holds it whole
    trailing = (first.shape[1:], first.dtype, first.device)
    for leaf, size, (rows, _) in zip(column, sizes, parts, strict=True):
        part = f"the value for rows {rows.start}:{rows.stop}"
        if not _is_batch(leaf, size):
            raise ShapeError(
                f"{part} holds {describe(leaf)}; its first dimension must be the invoke's number "
                f"of rows, {size}"
            )
        if (leaf.shape[1:], leaf.dtype, leaf.device) != trailing:
            first_rows = parts[0][0]
            raise ShapeError(
                f"{part} holds {describe(leaf)} and the one for rows {first_rows.start}:"
                f"{first_rows.stop} {describe(first)}; they must agree in every dimension but "
                "the first, in dtype and in device"
            )
    return torch.cat(column, dim=0)


def _merge_rows(leaf: torch.Tensor, views: list[tuple[slice, Any]]) -> Any:
    """A new tensor: `leaf` with each `(rows, view)` written over its rows (out of place)."""
    if len(views) == 1:
        rows, view = views[0]
        return torch.slice_scatter(leaf, view, 0, rows.start, rows.stop)
    parts = []
    covered = 0
    for rows, view in views:
        if rows.start > covered:
            parts.append(leaf[covered : rows.start])
        parts.append(view)
        covered = rows.stop
    if covered < leaf.shape[0]:
        parts.append(leaf[covered:])
    return torch.cat(parts, dim=0)
