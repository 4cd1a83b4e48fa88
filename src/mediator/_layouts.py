"""Where each module's values hold the batch: the batch dimension of every tensor they carry.

A module's *layout* says, for its inputs and for its output, on which dimension each tensor leaf
(in `_tree.flatten` order, inputs positional then keyword) holds the batch rows. `Dims` is a tuple
with one entry per tensor leaf, the last entry repeating for further leaves; an entry is a
dimension, or None for a leaf that has no rows (every invoke sees it whole). `None` instead of a
tuple is the default rule: a tensor whose dim 0 is the batch size is batched on dim 0, others
have no rows. A string instead of a tuple means the rows cannot be told; it is the reason,
raised as a `ShapeError` when an invoke of several reads or edits such a value.

`site_dims` decides the layout of every site of a model once, when it is wrapped: a user's
override (`Batcher(batch_dims=...)`) first, then the types the library knows (`nn.RNNBase`),
then the structural rule (a module holding a sequence-first layer, or inside one, cannot be
told). This module owns no state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

from torch import nn

from ._errors import UsageError
from ._names import closest_hint

#: One tensor leaf's batch dimension, or None for a leaf without rows.
Dim = Union[int, None]  # noqa: UP007 - a runtime alias: `int | None` is no value in Python 3.9 terms
#: The batch dimensions of a value's tensor leaves (see the module docstring).
Dims = Union[tuple[Dim, ...], str, None]  # noqa: UP007


@dataclass(frozen=True)
class BatchDims:
    """Where a module's inputs and output hold the batch: for `Batcher(batch_dims=...)`.

    `inputs` and `output` are each a dimension (every tensor leaf has its batch there), None
    (no tensor leaf has rows: every invoke sees the whole value, and its edits reach every
    invoke), or a tuple of those, one per tensor leaf in order (inputs: positional, then
    keyword; nested tuples, lists, dicts and dataclasses depth first), the last one repeating.
    A plain int, None or tuple given to `batch_dims` stands for both inputs and output.

    Example:

        batcher = mediator.Batcher(batch_dims={
            "encoder": 1,                                   # [T, batch, H] in and out
            "pool": mediator.BatchDims(inputs=1, output=0), # [T, batch, H] in, [batch, H] out
            "stats": mediator.BatchDims(output=(0, None)),  # (per-row, batch-wide) output
        })
        model = mediator.Model(net, batcher=batcher)
    """

    inputs: Dim | tuple[Dim, ...] = 0
    output: Dim | tuple[Dim, ...] = 0

    def dims(self) -> tuple[tuple[Dim, ...], tuple[Dim, ...]]:
        """The layout as `(input dims, output dims)`, each a tuple.

        Example:

            BatchDims(inputs=1, output=(0, None)).dims()  # ((1,), (0, None))
        """
        return _as_tuple(self.inputs), _as_tuple(self.output)


#: What `Batcher(batch_dims=...)` takes per module path.
BatchDimsSpec = Union[int, None, tuple[Dim, ...], BatchDims]  # noqa: UP007


def as_batch_dims(spec: BatchDimsSpec) -> BatchDims:
    """The `BatchDims` that an override value stands for (an int, None or tuple: both)."""
    if isinstance(spec, BatchDims):
        return spec
    if spec is None or isinstance(spec, (int, tuple)):
        return BatchDims(spec, spec)
    raise TypeError(
        f"batch_dims values are an int, None, a tuple of them or mediator.BatchDims; got "
        f"{type(spec).__name__}"
    )


def known_dims(module: nn.Module) -> BatchDims | None:
    """The layout of a module type the library knows, else None (the default rule).

    RNN, GRU and LSTM: the sequence (first input, first output) has the batch on dim 0 with
    `batch_first=True` and on dim 1 without; hidden states are `[layers * dirs, batch, H]`,
    batch on dim 1 either way.

    Example:

        known_dims(nn.LSTM(4, 8, num_layers=2))  # BatchDims(inputs=(1, 1), output=(1, 1))
    """
    if isinstance(module, nn.RNNBase):
        sequence = 0 if module.batch_first else 1
        return BatchDims((sequence, 1), (sequence, 1))
    return None


def site_dims(
    root: nn.Module,
    paths: list[str],
    declared: Mapping[str, BatchDims | None],
) -> tuple[list[Dims], list[Dims]]:
    """Each site's input and output dims (`Dims`), from `declared` (the Batcher's layout for
    every module it knows; None for the default rule) and the structural rule."""
    modules = dict(root.named_modules())
    seq_first = {path: module for path, module in modules.items() if _sequence_first(module)}
    inputs: list[Dims] = []
    outputs: list[Dims] = []
    for path in paths:
        layout = declared.get(path)
        if layout is not None:
            dims_in, dims_out = layout.dims()
            inputs.append(dims_in)
            outputs.append(dims_out)
            continue
        reason = _unknown(path, modules, seq_first)
        inputs.append(reason)
        outputs.append(reason)
    return inputs, outputs


def check_overrides(overrides: Mapping[str, object], paths: list[str]) -> None:
    """Raise UsageError for an override whose path names no module of the model with a forward
    of its own (its values never reach a trace)."""
    for path in overrides:
        if path not in paths:
            hint = closest_hint(path, paths)
            raise UsageError(
                f"Batcher(batch_dims=...) names {path!r}, which is no module of this model "
                f"with a forward of its own ('' is the model itself).{hint}"
            )


def _unknown(path: str, modules: dict[str, nn.Module], seq_first: dict[str, nn.Module]) -> Dims:
    """Why the rows of `path`'s values cannot be told (it is, runs inside or holds a sequence-first
    layer other than an RNN, whose layout is known), or None for the default rule."""
    module = modules[path]
    name = type(module).__name__
    if path in seq_first and not isinstance(module, nn.RNNBase):
        return _declare(path, f"{name} is a sequence-first layer", module)
    for other, layer in seq_first.items():
        if path.startswith(f"{other}.") and not isinstance(layer, nn.RNNBase):
            return _declare(path, f"{name} runs inside the sequence-first layer {other!r}", layer)
    for other, layer in seq_first.items():
        if other != path and (path == "" or other.startswith(f"{path}.")):
            return _declare(path, f"{name} holds the sequence-first layer {other!r}", layer)
    return None


def _declare(path: str, relation: str, layer: nn.Module) -> str:
    return (
        f"{relation} ({type(layer).__name__} with batch_first=False), so the batch dimension "
        f"of its values is not known; declare it: mediator.Batcher(batch_dims={{{path!r}: dim}})"
        " (or mediator.BatchDims(inputs=..., output=...))"
    )


def _sequence_first(module: nn.Module) -> bool:
    """Whether `module` takes `[T, batch, ...]`: `batch_first=False`, also on the attention of
    torch's own transformer layers (which keep the flag there)."""
    if getattr(module, "batch_first", True) is False:
        return True
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return getattr(module.self_attn, "batch_first", True) is False
    return False


def _as_tuple(dims: Dim | tuple[Dim, ...]) -> tuple[Dim, ...]:
    if dims is None or isinstance(dims, int):
        return (dims,)
    if not dims or not all(d is None or isinstance(d, int) for d in dims):
        raise TypeError(f"batch dims must be ints or None, got {dims!r}")
    return tuple(dims)
