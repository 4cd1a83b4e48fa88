"""Written values take the device and dtype of the values they replace.

A body's `.output = v`, `.inputs = ...`, `.input = v` and `.skip(v)` may hand over a tensor made
elsewhere: on the CPU for a module that runs on a GPU (a model spread over devices with
`device_map`), or in float32 for a bfloat16 model. `conform` moves each such tensor to the device
and dtype of the tensor it replaces, leaf by leaf in nested values, so the rest of the forward
computes as it would on the model's own value; autograd follows the move. A dtype changes only
where PyTorch lets an in-place operation write it (`torch.can_cast`: float32 into bfloat16 or an
integer into a float, yes; a float into an integer or a bool, a complex into a float, no): such a
write would silently lose what the value holds, so it raises `ShapeError` instead. Tensors that
already match pass as they are (the same object: no copy, only the comparison), and so does a
value whose structure or shapes differ from the old one's (the Batcher's `check_replacement`
then says what does not fit). Tensors inside cache objects are not moved. Owns no state.
"""

from __future__ import annotations

from typing import Any

import torch

from ._errors import ShapeError
from ._tree import describe, flatten


def conform(old: Any, new: Any, where: str) -> Any:
    """`new` with each tensor moved to the device and dtype of the tensor of `old` it replaces;
    `new` itself where nothing needs to move. `where` names the module and the user's line in
    the `ShapeError` of a dtype that cannot be cast without loss.

    Example:

        old = torch.zeros(2, 8, dtype=torch.bfloat16)
        conform(old, torch.ones(2, 8), "layers.1.output")                   # bfloat16 ones
        conform(old, torch.ones(2, 8, dtype=torch.long), "layers.1.output")   # bfloat16 too
        conform(old.long(), torch.ones(2, 8), "layers.1.output")            # ShapeError
    """
    if isinstance(old, torch.Tensor):
        return _conform_tensor(old, new, where) if isinstance(new, torch.Tensor) else new
    old_leaves, _ = flatten(old)
    new_leaves, rebuild = flatten(new)
    if len(old_leaves) != len(new_leaves):
        return new
    moved = [
        _conform_tensor(before, after, where)
        if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
        else after
        for before, after in zip(old_leaves, new_leaves, strict=True)
    ]
    if all(after is leaf for after, leaf in zip(moved, new_leaves, strict=True)):
        return new
    return rebuild(moved)


def _conform_tensor(old: torch.Tensor, new: torch.Tensor, where: str) -> torch.Tensor:
    dtype, device = old.dtype, old.device
    if (new.dtype == dtype and new.device == device) or new.shape != old.shape:
        return new
    if not torch.can_cast(new.dtype, dtype):
        raise ShapeError(
            f"{where}: got {describe(new)}, expected {describe(old)}; a {new.dtype} value is not "
            f"written over a {dtype} one, since the cast would lose what it holds. Convert it "
            f"yourself first if that is what you mean (v.to({dtype}))"
        )
    try:
        return new.to(device=device, dtype=dtype)
    except (RuntimeError, NotImplementedError) as error:  # e.g. out of a meta tensor
        raise ShapeError(
            f"{where}: got {describe(new)}, expected {describe(old)}; it cannot be moved to "
            f"{device} ({error}). Write a tensor that holds data"
        ) from None
