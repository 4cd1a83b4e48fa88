"""One input of every invoke, concatenated along its batch dim into the batch's input.

`Batcher.batch` calls `concatenate_column` for each input position (positional or keyword); a
value that cannot be batched raises `ShapeError` naming the input, the invokes and what differs.
This module owns no state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._errors import ShapeError
from ._kv_cache import is_cache
from ._rows import without
from ._tree import describe, same_tensor


def concatenate_column(
    values: tuple[Any, ...],
    indices: list[int],
    name_of: Callable[[], str],
    dim: int | None = 0,
) -> Any:
    """`values` (one per invoke, `indices` their invokes) as one input of the batch."""
    first = values[0]
    caches = [(i, v) for i, v in zip(indices, values, strict=False) if is_cache(v)]
    if caches:
        index, cache = caches[0]
        raise ShapeError(
            f"cannot batch {name_of()}: invoke {index} passes a {type(cache).__name__}, a "
            "cache of the model's state for its own rows, which cannot be shared with or "
            "joined to other invokes' rows; trace an invoke that continues from a cache "
            "on its own",
            invokes=tuple(i for i, _ in caches),
        )
    if not isinstance(first, torch.Tensor) or dim is None:
        for value, index in zip(values[1:], indices[1:], strict=False):
            if not _same_constant(first, value):
                raise ShapeError(
                    f"cannot batch {name_of()}: invoke {indices[0]} passes {_shown(first)} "
                    f"and invoke {index} passes {_shown(value)}; inputs that are not "
                    "tensors, or have no rows, must be equal",
                    invokes=(indices[0], index),
                )
        return first
    dtype = first.dtype  # torch.cat would promote mixed dtypes silently: check them first
    if all(type(value) is torch.Tensor and value.dtype is dtype for value in values):
        try:
            return torch.cat(values, dim=dim)
        except (RuntimeError, IndexError):
            pass  # shapes, dimensions or devices differ: explain which invoke's below
    trailing = (without(first, dim), first.dtype, first.device)
    for value, index in zip(values, indices, strict=False):
        if not isinstance(value, torch.Tensor) or value.dim() <= dim:
            raise ShapeError(
                f"cannot batch {name_of()}: invoke {index} passes {describe(value)}; batched "
                f"inputs must be tensors with a batch dimension (dim {dim})",
                invokes=(index,),
            )
        if (without(value, dim), value.dtype, value.device) != trailing:
            raise ShapeError(
                f"cannot batch {name_of()}: invoke {indices[0]} passes {describe(first)} and "
                f"invoke {index} passes {describe(value)}; all dimensions but the batch "
                f"dimension (dim {dim}), the dtype and the device must agree (pad to one "
                "length, or trace them separately)",
                invokes=(indices[0], index),
            )
    return torch.cat(values, dim=dim)


def _same_constant(first: Any, value: Any) -> bool:
    """Whether an input without rows is the same in two invokes (tensors: equal values)."""
    if isinstance(first, torch.Tensor) or isinstance(value, torch.Tensor):
        return same_tensor(first, value)
    return bool(value == first)


def _shown(value: Any) -> str:
    return describe(value) if isinstance(value, torch.Tensor) else repr(value)
