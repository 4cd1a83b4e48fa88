"""Gradients under activation checkpointing: what a trace does inside a checkpointed region.

`torch.utils.checkpoint` (and Hugging Face's `gradient_checkpointing_enable()`, which calls it)
runs a region of the forward without keeping what autograd saves for backward, and runs the region
again during backward to get it back. That second run sees no intervention: no body runs again,
and after the trace no tap is left. What a trace does about it depends on the form:

Non-reentrant (`use_reentrant=False`, Hugging Face's default)
    Backward uses the graph of the traced forward itself (interventions included) and only
    recomputes the tensors the region saved, matched by the order they were saved in; it stops
    as soon as it has them all. At the first boundary of a region where the trace does anything
    (serves a body or a cache), `keep_saved_tensors` replaces the region's saved-tensor hooks on
    the model thread by hooks that keep each tensor: from there to the end of the region,
    backward uses the very values the traced forward computed. What the region saved before that
    boundary is still recomputed: nothing of the trace touched it, and the recomputation
    reproduces it op for op and stops before it reaches the boundary (early stop is made sure
    of). So gradients are exactly those without checkpointing, the region still saves memory up
    to its first touched boundary, and the recomputation never meets a body or a tap.

Reentrant (`use_reentrant=True`)
    The region runs under `no_grad`, and backward builds its graph anew from a plain run: an
    edit made in the region cannot reach the gradients. A boundary inside such a region where an
    invoke writes (a swap, a skip, an in-place edit) fails the trace at once with a `UsageError`
    that names the boundary, the invoke and the module whose forward checkpoints
    (`refuse_reentrant_writes`). Reads there are served as usual: exact values that carry no
    gradient (torch computes them under `no_grad`).

Torch internals relied on (the tests fail if they change): the pack hook of
`torch.utils.checkpoint._checkpoint_hook`, recognised by its qualified name, the `frame` it closes
over (`early_stop`), and the code of `CheckpointFunction.forward`, found on the model thread's
stack.

This module owns no state.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.checkpoint import CheckpointFunction

from ._errors import UsageError
from ._tree import tensors

if TYPE_CHECKING:
    from ._boundary import Boundary
    from ._interleaver import Interleaver
    from ._mediator import Mediator

_ag = torch._C._autograd
_CHECKPOINT_PACK = "_checkpoint_hook.__init__.<locals>.pack_hook"
_REENTRANT_FORWARD = CheckpointFunction.forward.__code__

#: The version counter of every tensor of a value, before anyone was served at its boundary.
Versions = list[tuple[torch.Tensor, int]]


def enter_boundary(value: Any) -> Versions | None:
    """At a served boundary of a trace that builds a graph (model thread, before anyone is
    served): with grad on, keep the saved tensors of a non-reentrant region from here on; with
    grad off (possibly inside a reentrant region), note the versions of `value`'s tensors."""
    if torch.is_grad_enabled():
        keep_saved_tensors()
        return None
    return [(tensor, tensor._version) for tensor in tensors(value)]


def keep_saved_tensors() -> None:
    """If the model thread stands inside a non-reentrant checkpointed region, make the rest of
    the region (and of every region around it) keep the tensors autograd saves."""
    top = _ag._top_saved_tensors_default_hooks(True)
    if top is None or not _is_checkpoint_pack(top[0]):
        return  # outside any region, or already keeping
    stack = []
    while (top := _ag._top_saved_tensors_default_hooks(True)) is not None:
        stack.append(top)
        _ag._pop_saved_tensors_default_hooks()
    for pack, unpack in reversed(stack):
        if _is_checkpoint_pack(pack):
            _recompute_until_saved(pack)
            pack, unpack = _keep, _kept  # the region's own exit pops this pair
        _ag._push_saved_tensors_default_hooks(pack, unpack)


def refuse_reentrant_writes(interleaver: Interleaver, boundary: Boundary, before: Versions) -> None:
    """After a boundary served with grad off in a trace that builds a graph: if an invoke wrote
    there and the boundary lies inside a reentrant checkpointed region, fail the trace."""
    if not _wrote(boundary, before):
        return
    checkpointing = _checkpointing_site(interleaver.call.__code__)
    if checkpointing is None:
        return  # a plain no_grad part of the model: no gradient to get wrong
    path = interleaver.paths[checkpointing] if checkpointing >= 0 else ""
    module = f"`{path}`" if path else "the model (its root module)"
    invokes = ", ".join(str(mediator.index) for mediator in _writers(boundary, before))
    raise UsageError(
        f"{boundary.describe()} was written by invoke {invokes}, inside a region that the "
        f"forward of {module} checkpoints (activation checkpointing, torch.utils.checkpoint with "
        "use_reentrant=True): backward runs that region again without the interventions, so "
        "its gradients would silently differ from those without checkpointing. Use "
        "non-reentrant checkpointing (model.gradient_checkpointing_enable("
        "gradient_checkpointing_kwargs={'use_reentrant': False}), or use_reentrant=False), turn "
        "checkpointing off for the trace (model.gradient_checkpointing_disable()), or trace "
        "under torch.no_grad() if no gradient is needed"
    )


def _is_checkpoint_pack(pack: Callable[..., Any]) -> bool:
    return getattr(pack, "__qualname__", None) == _CHECKPOINT_PACK


def _recompute_until_saved(pack: Callable[..., Any]) -> None:
    """Make the region's recomputation stop once it has what the region saved (without early
    stop it would run on past the kept part and fail)."""
    code = getattr(pack, "__code__", None)
    closure = getattr(pack, "__closure__", None)
    if code is not None and closure is not None and "frame" in code.co_freevars:
        frame = closure[code.co_freevars.index("frame")].cell_contents
        frame.early_stop = True


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    """Pack: keep the tensor itself (detached, as checkpointing's own recomputation does, so
    that a saved output holds no reference back to its own node)."""
    return tensor.detach() if tensor.requires_grad else tensor


def _kept(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _wrote(boundary: Boundary, before: Versions) -> bool:
    """Whether an invoke swapped, skipped or edited in place at `boundary`."""
    if boundary.skips:
        return True
    views = boundary.views
    for mediator, view in boundary.handed:
        if views.get(mediator) is not view:
            return True
    return any(tensor._version != version for tensor, version in before)


def _writers(boundary: Boundary, before: Versions) -> list[Mediator]:
    """The invokes that swapped or skipped at `boundary`, or, after an in-place edit of its
    value, every invoke it was handed to."""
    handed = dict(reversed(boundary.handed))  # each invoke's first view
    writers = set(boundary.skips)
    writers.update(m for m, view in boundary.views.items() if handed.get(m) is not view)
    if any(tensor._version != version for tensor, version in before):
        writers.update(handed)
    return sorted(writers, key=lambda mediator: mediator.index)


def _checkpointing_site(call: types.CodeType) -> int | None:
    """If the model thread runs inside `CheckpointFunction.forward`, the site of the module
    whose forward called it (-1: no tapped module did); else None."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code is not _REENTRANT_FORWARD:
        frame = frame.f_back
    if frame is None:
        return None
    while (frame := frame.f_back) is not None:
        if frame.f_code is call:
            return int(frame.f_locals["site"])
    return -1
