"""The Batcher: one batched forward for all invokes of a trace, and each invoke's view of it.

`batch` concatenates the invokes' inputs along their batch dimension and gives each invoke its
rows. `narrow` cuts an invoke's rows out of any value met during the forward, along each tensor's
batch dimension (`_layouts.py`: declared, known for the module type, or dim 0 when it is the
total batch size; a value whose rows cannot be told raises `ShapeError`), cache objects included
(`_kv_cache.py`). `merge` writes the invokes' edited rows back into the full value without
touching the original in place, so autograd sees every invoke's view on the path from input to
loss. `join` puts together a full value from the invokes' own values (when each skips a call).
Rows scale with a known expansion of the batch (`expand`: beam search, several sequences per
prompt): a tensor with `f * total` rows gives each invoke `f` rows per row of its own. Subclass it
for models that need their own batching (padding, masks). The Batcher keeps only its overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ._columns import concatenate_column
from ._errors import ShapeError, UsageError
from ._kv_cache import cache_tensors, is_cache, merge_cache, narrow_cache
from ._layouts import BatchDims, BatchDimsSpec, Dims, as_batch_dims, known_dims
from ._rows import (
    dim_at,
    is_batch,
    join_leaves,
    merge_cached,
    merge_rows,
    narrow_along,
    narrow_leaf,
    rows_factor,
    scaled,
)
from ._tree import describe, flatten

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


class Batcher:
    """Concatenates invokes' inputs along the batch dimension and narrows values back to each
    invoke's rows.

    This is the default for models that are not causal language models. Which dimension of a
    value holds the batch (what is narrowed how):

    - a module declared in `batch_dims` (by path; `""` is the model itself, whose input dims
      are also those the invokes' inputs are concatenated along): as declared, an int, None
      (no rows: every invoke sees the whole value), a tuple per tensor leaf, or
      `mediator.BatchDims(inputs=..., output=...)`; a tensor that does not have the batch
      size there raises `ShapeError`;
    - RNN, GRU, LSTM (`nn.RNNBase`): the sequence on dim 0 with `batch_first`, else dim 1;
      hidden states `[layers * dirs, batch, H]` on dim 1;
    - a module that holds a sequence-first layer (`batch_first=False`), or runs inside one
      (other than an RNN): not known, so reading or editing it with several invokes raises
      `ShapeError`, naming the module, until it is declared;
    - any other module: a tensor whose dim 0 is the total batch size is batched on dim 0,
      others are seen whole by every invoke (a constant, a mask shared by all rows);
    - cache objects (`transformers` `DynamicCache` and the like): dim 0 of their key and value
      tensors; an invoke's view is a cache of the same type over its rows, so in-place edits
      reach its rows only;
    - a batch expanded by a known factor (beam search, `num_return_sequences` in `generate`):
      a tensor with `f * total` rows on its batch dim gives each invoke its `f` rows per row.

    Override `layout` to decide per module in code, or `batch`, `narrow`, `merge`, `join` and
    `check_replacement` for models batched differently still (padding, masks).

    Example:

        model = mediator.Model(net, batcher=mediator.Batcher(batch_dims={"encoder.proj": 1}))

        class PadRight(mediator.Batcher):
            def batch(self, inputs, generate=False, dims=None):
                width = max(entry[0][0].shape[1] for entry in inputs if entry is not None)
                padded = [
                    None if entry is None else ((pad_to(entry[0][0], width),), entry[1])
                    for entry in inputs
                ]
                return super().batch(padded, generate, dims)

        model = mediator.Model(net, batcher=PadRight())
    """

    batch_dims: Mapping[str, BatchDims] = MappingProxyType({})

    def __init__(self, batch_dims: Mapping[str, BatchDimsSpec] | None = None) -> None:
        self.batch_dims = {path: as_batch_dims(spec) for path, spec in (batch_dims or {}).items()}

    def layout(self, path: str, module: nn.Module) -> BatchDims | None:
        """Where the values of the module at `path` hold the batch, or None for the default
        rule (dim 0 where it is the total batch size). Called once per module when a `Model`
        wraps it: the declared `batch_dims`, else the module types the library knows.

        Example:

            class StatesOnDim1(mediator.Batcher):
                def layout(self, path, module):
                    if isinstance(module, MyStateful):
                        return mediator.BatchDims(inputs=0, output=1)
                    return super().layout(path, module)
        """
        declared = self.batch_dims.get(path)
        return declared if declared is not None else known_dims(module)

    def batch(
        self, inputs: list[Inputs | None], generate: bool = False, dims: Dims = None
    ) -> tuple[Inputs, list[slice | None], int]:
        """Batch the inputs of every invoke (None for an empty invoke); `generate` says whether
        they go to the module's `generate` rather than its forward, `dims` where the model's
        inputs hold the batch (`_layouts.Dims` of the model itself; None: dim 0).

        Returns the batched `(args, kwargs)`, each invoke's rows (`None` for "the whole batch")
        and the total batch size. Raises `UsageError` when no invoke has inputs, and
        `ShapeError` when the inputs cannot be concatenated or their batch dim is not known.

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
        if isinstance(dims, str):
            if len(given) == 1:
                dims = None  # nothing is concatenated, and one invoke's values are not narrowed
            else:
                raise ShapeError(f"cannot batch the invokes' inputs: the model {dims}")
        if len(given) == 1:
            return given[0][1], [None] * len(inputs), self._rows_of(given[0][1], given[0][0], dims)
        sizes = [self._rows_of(entry, index, dims) for index, entry in given]
        rows: list[slice | None] = [None] * len(inputs)
        start = 0
        for (index, _), size in zip(given, sizes, strict=False):
            rows[index] = slice(start, start + size)
            start += size
        entries, indices = [entry for _, entry in given], [i for i, _ in given]
        return self._concatenate(entries, indices, dims), rows, start

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

    def narrow(
        self,
        value: Any,
        rows: slice,
        total: int,
        dims: Dims = None,
        expand: tuple[int, ...] = (),
    ) -> Any:
        """The part of `value` that belongs to `rows` (views, no copies).

        Every tensor in `value` (also inside tuples, lists, dicts, dataclasses and cache
        objects) is cut to `rows` along its batch dimension: per `dims` (a `_layouts.Dims`:
        None is the default rule, dim 0 where it is `total`); a tensor with `f * total` rows
        there, `f` in `expand`, is cut to the `f` rows of each of `rows`. Leaves without rows
        are kept whole. Raises `ShapeError` where `dims` says the rows cannot be told, or a
        declared batch dim does not have the batch size.

        Example:

            h = torch.randn(3, 8)
            first = batcher.narrow(h, slice(0, 1), total=3)         # h[0:1], a view
            pair = batcher.narrow((h, mask), slice(1, 3), total=3)  # (h[1:3], mask[1:3])
            states = batcher.narrow(torch.randn(2, 3, 8), slice(1, 3), 3, dims=(1,))  # [:, 1:3]
        """
        if dims is None and not expand and isinstance(value, torch.Tensor):
            return narrow_leaf(value, rows, total)
        leaves, rebuild = flatten(value)
        new = []
        position = 0
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                dim = dim_at(dims, position, value)
                position += 1
                new.append(narrow_along(leaf, dim, rows, total, expand, dims is not None))
            elif is_cache(leaf):
                dim_at(dims, position, value)  # a cache under unknown dims is not known either
                narrow = partial(narrow_along, dim=0, rows=rows, total=total, expand=expand)
                new.append(narrow_cache(leaf, partial(narrow, declared=False, in_cache=True)))
            else:
                new.append(leaf)
        return rebuild(new)

    def merge(
        self,
        full: Any,
        views: list[tuple[slice, Any]],
        total: int,
        dims: Dims = None,
        expand: tuple[int, ...] = (),
    ) -> Any:
        """Rebuild `full` from each invoke's (possibly replaced) view of its rows.

        `views` lists `(rows, view)` for the invokes that hold a view, in row order; `dims`
        and `expand` are those `narrow` took. The result is a new value: `full` is not written
        to in place, so autograd sees every view on the path to the loss. Leaves that are not
        batched take an invoke's replacement. A cache object is the model's state: it stays
        the same object, and a tensor an invoke replaced in it is merged in (out of place).

        Example:

            h = torch.zeros(3, 8)
            new = batcher.merge(h, [(slice(0, 1), torch.ones(1, 8))], total=3)
            # new[0] is all ones, new[1:] all zeros; h is unchanged
        """
        if dims is None and not expand and isinstance(full, torch.Tensor):
            return merge_rows(full, views, 0) if is_batch(full, total) else full
        full_leaves, rebuild = flatten(full)
        view_leaves = [(rows, flatten(view)[0]) for rows, view in views]
        merged = []
        position = 0
        for index, leaf in enumerate(full_leaves):
            if isinstance(leaf, torch.Tensor):
                dim = dim_at(dims, position, full)
                position += 1
                factor = rows_factor(leaf, dim, total, expand, dims is not None)
                if factor is not None and dim is not None:
                    parts = [(scaled(rows, factor), ls[index]) for rows, ls in view_leaves]
                    merged.append(merge_rows(leaf, parts, dim))
                    continue
            elif is_cache(leaf):
                for rows, leaves in view_leaves:
                    if leaves[index] is not leaf:
                        merge_cache(leaf, leaves[index], partial(merge_cached, rows, total, expand))
                merged.append(leaf)
                continue
            for _, leaves in view_leaves:
                if leaves[index] is not full_leaves[index]:
                    leaf = leaves[index]
            merged.append(leaf)
        return rebuild(merged)

    def join(self, parts: list[tuple[slice, Any]], total: int, dims: Dims = None) -> Any:
        """The full value made of the invokes' own values for their rows, the inverse of
        `narrow`: used for a call that every invoke skips (`.skip(v)`).

        `parts` lists `(rows, value)` in row order, covering all `total` rows. A tensor whose
        batch dimension (per `dims`, as in `narrow`; dim 0 by default) is its part's number of
        rows in every part is concatenated along it; one of the same shape in every part is
        not batched (`narrow` hands it whole to every invoke), and it and the other leaves are
        taken from the first part. Raises `ShapeError` when the values differ in structure, a
        tensor fits neither case, or a value holds a cache object (its rows are the model's
        state, not the invokes' values).

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
        if any(is_cache(leaf) for leaf in flat[0]):
            raise ShapeError(
                f"the skip values hold a {describe(next(x for x in flat[0] if is_cache(x)))}: a "
                "cache cannot be put together from the invokes' values; let the call run in at "
                "least one invoke and replace its output there"
            )
        joined = []
        position = 0
        for column in zip(*flat, strict=True):
            dim: int | None = 0
            if isinstance(column[0], torch.Tensor):
                dim = dim_at(dims, position, first)
                position += 1
            joined.append(column[0] if dim is None else join_leaves(column, parts, dim))
        return flatten(first)[1](joined)

    def check_replacement(self, old: Any, new: Any, where: str) -> None:
        """Raise ShapeError unless `new` can stand where `old` stood (same structure, shapes,
        dtypes and devices of its tensors, also those inside cache objects).

        Called for every `.output = v`, `.inputs = ...`, `.input = v` and `.skip(v)`, after the
        library has moved the new value's tensors to the devices and dtypes of those they
        replace (where that cast loses nothing); `where` names the module and the user's line in
        the error message.

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
            elif is_cache(old_leaf) and new_leaf is not old_leaf:
                self.check_replacement(
                    cache_tensors(old_leaf), _tensors_of_cache(new_leaf, old_leaf, where), where
                )

    def _rows_of(self, entry: Inputs, index: int, dims: Dims) -> int:
        args = entry[0]
        if dims is None and args and type(args[0]) is torch.Tensor and args[0].dim() > 0:
            return int(args[0].shape[0])  # the common case, without flattening the inputs
        position = 0
        for leaf in _leaves(entry, list(entry[1])):
            if isinstance(leaf, torch.Tensor):
                dim = dim_at(dims, position, entry)
                position += 1
                if dim is not None and leaf.dim() > dim:
                    return int(leaf.shape[dim])
        raise UsageError(
            f"invoke {index} has inputs but no tensor with a batch dimension among them: the "
            "batch size is the batch dimension (the first, unless declared) of the first "
            "tensor input"
        )

    def _concatenate(self, entries: list[Inputs], indices: list[int], dims: Dims) -> Inputs:
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
        batched = []
        position = 0
        for i, column in enumerate(columns):
            dim: int | None = 0
            if isinstance(column[0], torch.Tensor):
                dim = dim_at(dims, position, entries[0])
                position += 1
            name_of = partial(_leaf_name, entries[0], keys, i)
            batched.append(concatenate_column(column, indices, name_of, dim))
        if not keys and all(type(arg) is torch.Tensor for arg in first_args):
            return tuple(batched), {}
        _, rebuild = flatten((first_args, first_kwargs))
        args, kwargs = rebuild(batched)
        return tuple(args), dict(kwargs)


def narrow_with(
    batcher: Batcher, value: Any, rows: slice, total: int, dims: Dims, expand: tuple[int, ...]
) -> Any:
    """`batcher.narrow(...)`, passing `dims` and `expand` only where they are not the defaults:
    a subclass written for `narrow(value, rows, total)` keeps working for the default rule."""
    if dims is None and not expand:
        return batcher.narrow(value, rows, total)
    return batcher.narrow(value, rows, total, dims, expand)


def merge_with(
    batcher: Batcher,
    full: Any,
    views: list[tuple[slice, Any]],
    total: int,
    dims: Dims,
    expand: tuple[int, ...],
) -> Any:
    """`batcher.merge(...)`, passing `dims` and `expand` only where they are not the defaults."""
    if dims is None and not expand:
        return batcher.merge(full, views, total)
    return batcher.merge(full, views, total, dims, expand)


def join_with(batcher: Batcher, parts: list[tuple[slice, Any]], total: int, dims: Dims) -> Any:
    """`batcher.join(...)`, passing `dims` only where it is not the default."""
    return batcher.join(parts, total) if dims is None else batcher.join(parts, total, dims)


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


def _tensors_of_cache(new: Any, old: Any, where: str) -> list[torch.Tensor]:
    if type(new) is not type(old):
        raise ShapeError(
            f"{where}: got {describe(new)}, expected {describe(old)}; replace a cache with one "
            "of its type"
        )
    return cache_tensors(new)
