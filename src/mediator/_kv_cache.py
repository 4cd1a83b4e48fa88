"""Key/value cache objects (`transformers` `Cache` subclasses) seen by one invoke: its own rows.

A cache is mutable state the model updates in place: `DynamicCache` holds `layers[i].keys` and
`.values` (older versions `key_cache`/`value_cache` lists), `EncoderDecoderCache` two caches.
Their tensors are `[batch, heads, T, d]`, batched on dim 0. An invoke's view of a cache is a
copy of the cache object (and of the layer objects and lists inside it) whose tensors are views
of its rows, so an in-place edit of them lands in the model's cache, in its rows only. Tensors
whose dim 0 is not the batch (lengths, offsets) are shared whole. The copy is a snapshot of the
cache as the boundary saw it: what the model adds later (the keys of the current step, a layer it
initialises) goes into the model's cache, not into an invoke's copy; read the cache at a later
boundary to see it.

Merging writes into the model's own cache object (the model keeps using it, so it must stay the
same object): a tensor an invoke replaced is merged into the batch tensor out of place and set
on the cache; a tensor that still is the invoke's view of its rows needs nothing. This module
owns one memo: which types are caches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from ._errors import ShapeError
from ._tree import describe

#: type -> whether it is a `transformers` cache (looked up by name: no import of transformers).
_IS_CACHE: dict[type, bool] = {}

#: Narrows (or merges) one tensor of a cache; returns it unchanged where it has no rows.
TensorMap = Callable[[torch.Tensor], torch.Tensor]


def is_cache(value: Any) -> bool:
    """Whether `value` is a `transformers` cache object (a subclass of `Cache`)."""
    kind = type(value)
    known = _IS_CACHE.get(kind)
    if known is None:
        known = _IS_CACHE[kind] = any(
            base.__name__ == "Cache" and base.__module__.startswith("transformers")
            for base in kind.__mro__
        )
    return known


def narrow_cache(cache: Any, narrow: TensorMap) -> Any:
    """A view of `cache`: the same type, its tensors `narrow(tensor)` (views of the rows)."""
    return _mapped(cache, narrow)


def merge_cache(full: Any, view: Any, merge: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
    """Write `view` (an invoke's cache for its rows) into the model's cache `full`, in place on
    the cache object: each tensor pair goes through `merge(full_tensor, view_tensor)`, which
    returns the new batch tensor (or the full one where nothing changed). Raises `ShapeError`
    when `view` has another structure."""
    if type(full) is not type(view):
        raise ShapeError(
            f"got a {describe(view)} for a {describe(full)}; replace a cache with one of its type"
        )
    _merge_into(full, view, merge)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The tensors a cache holds, in a fixed order (for shape checks)."""
    found: list[torch.Tensor] = []

    def collect(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    _mapped(cache, collect)
    return found


def _holds_state(value: Any) -> bool:
    """Whether a cache's attribute is worth walking: cache and layer objects of transformers
    (never models, configs or modules they may point to)."""
    module = type(value).__module__
    return module.startswith("transformers.cache_utils") or is_cache(value)


def _mapped(value: Any, fn: TensorMap) -> Any:
    """`value` with `fn` applied to every tensor it holds. Lists, dicts and cache objects are
    always copied, never shared: the model fills its own ones in place later (a layer not yet
    initialised gets the whole batch's keys), and an invoke's copy must not see that."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if type(value) is list:
        return [_mapped(item, fn) for item in value]
    if type(value) is tuple:
        items = [_mapped(item, fn) for item in value]
        changed = any(new is not old for new, old in zip(items, value, strict=True))
        return tuple(items) if changed else value
    if type(value) is dict:
        return {key: _mapped(item, fn) for key, item in value.items()}
    if hasattr(value, "__dict__") and _holds_state(value):
        new = copy.copy(value)
        vars(new).update({name: _mapped(item, fn) for name, item in vars(value).items()})
        return new
    return value


def _merge_into(full: Any, view: Any, merge: Callable[[torch.Tensor, torch.Tensor], Any]) -> Any:
    """`full` with `view`'s tensors merged in: lists and cache objects are updated in place
    (they are the model's state), tuples and dicts rebuilt; returns the (possibly new) value."""
    if isinstance(full, torch.Tensor):
        if not isinstance(view, torch.Tensor):
            raise ShapeError(f"got {describe(view)} where the cache holds {describe(full)}")
        return merge(full, view)
    if type(full) in (list, tuple):
        if type(view) is not type(full) or len(view) != len(full):
            raise ShapeError(f"got {describe(view)} where the cache holds {describe(full)}")
        items = [_merge_into(f, v, merge) for f, v in zip(full, view, strict=True)]
        if type(full) is tuple:
            return tuple(items)
        full[:] = items
        return full
    if type(full) is dict:
        return {key: _merge_into(item, view[key], merge) for key, item in full.items()}
    if hasattr(full, "__dict__") and _holds_state(full):
        fields = vars(full)
        for name, item in list(fields.items()):
            fields[name] = _merge_into(item, vars(view)[name], merge)
    return full
