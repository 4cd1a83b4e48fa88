"""Flattening and rebuilding the nested values modules take and return.

Module inputs and outputs are tensors, or tuples, lists, dicts, dataclasses and
`ModelOutput`-style objects (dicts that are also dataclasses) holding tensors. The Batcher narrows
and merges them leaf by leaf; this file turns such a value into a flat list of leaves and back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

Rebuild = Callable[[list[Any]], Any]


def _leaf(leaves: list[Any]) -> Any:
    return leaves.pop()


def flatten(value: Any) -> tuple[list[Any], Rebuild]:
    """The leaves of `value` (depth first) and a function that rebuilds it from new leaves."""
    leaves: list[Any] = []
    spec = _flatten_into(value, leaves)

    def rebuild(new_leaves: list[Any]) -> Any:
        stack = list(reversed(new_leaves))
        return spec(stack)

    return leaves, rebuild


def _flatten_into(value: Any, leaves: list[Any]) -> Callable[[list[Any]], Any]:
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return _leaf
    if isinstance(value, (tuple, list)):
        parts = [_flatten_into(item, leaves) for item in value]
        kind = type(value)
        if kind is tuple or kind is list:
            return lambda stack: kind(part(stack) for part in parts)
        if hasattr(value, "_fields"):  # namedtuple
            return lambda stack: kind(*(part(stack) for part in parts))
        return lambda stack: kind(part(stack) for part in parts)
    if isinstance(value, dict):
        keys = list(value.keys())
        parts = [_flatten_into(value[key], leaves) for key in keys]

        def rebuild_dict(stack: list[Any]) -> Any:
            new = copy.copy(value)
            for key, part in zip(keys, parts, strict=False):
                new[key] = part(stack)
            return new

        return rebuild_dict
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [field.name for field in dataclasses.fields(value)]
        parts = [_flatten_into(getattr(value, name), leaves) for name in names]

        def rebuild_dataclass(stack: list[Any]) -> Any:
            new = copy.copy(value)
            for name, part in zip(names, parts, strict=False):
                object.__setattr__(new, name, part(stack))
            return new

        return rebuild_dataclass
    leaves.append(value)
    return _leaf


def leaves(value: Any) -> list[Any]:
    """The leaves of `value` in `flatten`'s order, without a rebuild function."""
    found: list[Any] = []
    _collect(value, found)
    return found


def _collect(value: Any, found: list[Any]) -> None:
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _collect(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _collect(getattr(value, field.name), found)
    else:
        found.append(value)


def tensors(value: Any) -> list[torch.Tensor]:
    """The tensors among the leaves of `value` (the value itself if it is one), without
    building a rebuild function when it is a plain tensor."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [leaf for leaf in flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def same_tensor(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are one tensor, or tensors of one shape with equal values."""
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and (a is b or (a.shape == b.shape and bool(torch.equal(a, b))))
    )


def describe(value: Any) -> str:
    """A short human description of a value: `tensor[2, 5] float32` or `tuple of 3`."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        return f"tensor{list(value.shape)} {dtype} on {value.device}"
    if isinstance(value, (tuple, list, dict)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__
