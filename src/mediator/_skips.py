"""Calls that invokes skip (`.skip(v)`): the skipped rows get the invokes' own values.

When some rows skip, the module runs and each skipping invoke's rows are replaced. When every
row skips, the module does not run at all; its output is then the skip values joined by the
Batcher, and each value is first moved to the devices and dtypes of its rows of the output the
module would have given (`_devices.py`) and checked against them: a copy of the module runs its
forward on fake tensors (shapes, dtypes and devices, no data or compute), so neither the module,
its inputs nor the user's hooks see that run.

This module owns one cache, `_SPECS`: what that fake run returned (its structure and each
tensor's shape, dtype and device, no tensor; or that it failed), under what determines it: the
module (by id, and a weak reference that must still lead to it, so a new module at a freed
one's address misses), its forward (the same way), its submodules' types and training flags,
the names, shapes, strides, dtypes and devices of its parameters and buffers (a module the user
changed runs again), the inputs (tensors by the same, constants such as None, numbers and
strings by value; a call given any other object is not cached), and the default dtype and
device; calls under autocast are not cached. It keeps the 256 entries used last. `_SPECS_LOCK`
guards it; after `os.fork` the child gets a new one. A check against an entry compares each skip
value with stand-ins built from it on the real devices (one element of storage each), so the
Batcher's own `narrow` and `check_replacement` compare, with the messages of a check without it.

The fake run makes the fakes of plain parameters, buffers and inputs from their shapes, strides
and dtypes instead of converting the tensors (a conversion leaves reference cycles in PyTorch).
FakeTensorMode itself still leaves some for an operator it meets with new shapes (its dispatch
cache then misses), so a fake run of new shapes feeds the cycle collector, once per entry.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from ._batcher import join_with, narrow_with
from ._boundary import Boundary
from ._devices import conform
from ._errors import ShapeError, UsageError
from ._interrupts import model_call_site
from ._kv_cache import is_cache
from ._layouts import Dims
from ._protocol import OUTPUT, Key
from ._rows import rows_factor
from ._tap import strip
from ._tree import flatten, tensors

if TYPE_CHECKING:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ._interleaver import Interleaver
    from ._mediator import Mediator

MISSING: Any = object()
_NONE: Any = object()  # no spec: none cached, or an output that `_spec_of` cannot describe

#: Values that inputs and outputs may hold besides tensors and still be cached: constants,
#: compared (inputs) and kept (outputs) by value.
_CONSTANTS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)
#: The tensors the fake run makes fakes of by a factory (others are converted).
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SPECS_SIZE = 256
#: key -> (the module and its forward, weakly; the spec, or MISSING where the fake run failed)
_SPECS: OrderedDict[Hashable, tuple[weakref.ref[Any], weakref.ref[Any], Any]] = OrderedDict()
_SPECS_LOCK = threading.Lock()


@model_call_site
def run_skipped(
    il: Interleaver, boundary: Boundary, original: Callable[..., Any], args: Any, kwargs: Any
) -> Any:
    """Run a call that some invokes skip: skipped rows get the invokes' own values. When they
    are every row, the module does not run, and each value is checked against its rows of
    the output the module would have given (`_expected_output`). Its only calls out of this
    package run the module's own forward (or a copy of it, on fake tensors)."""
    skips = boundary.skips
    key = (boundary.key[0], OUTPUT, boundary.key[2])
    whole, parts = _split(skips)
    if not whole and sum(rows.stop - rows.start for rows, _ in parts) < il.total:
        _refuse_cache_writes(il, key, skips, args, kwargs)
        partial = Boundary(il, key, original(*args, **kwargs))
        for mediator, (value, where) in skips.items():
            partial.swap(mediator, _constant(value), f"{where} (skip)")
        return partial.merged()
    expected = _expected_output(original, args, kwargs)
    if expected is MISSING:  # check at least rows and structure: against the joined values
        output = whole[0] if whole else _join(il, key, parts, skips)
        _checked(il, key, output, skips)
        return output
    whole, parts = _split(_checked(il, key, expected, skips))
    return whole[0] if whole else _join(il, key, parts, skips)


def _split(skips: dict[Mediator, tuple[Any, str]]) -> tuple[list[Any], list[tuple[slice, Any]]]:
    """The skip values of invokes without rows, and `(rows, value)` of the others in row order."""
    whole = [value for mediator, (value, _) in skips.items() if mediator.rows is None]
    parts = sorted(
        ((m.rows, value) for m, (value, _) in skips.items() if m.rows is not None),
        key=lambda part: part[0].start,
    )
    return whole, parts


def _checked(
    il: Interleaver, key: Key, expected: Any, skips: dict[Mediator, tuple[Any, str]]
) -> dict[Mediator, tuple[Any, str]]:
    """The skip values, each moved to the devices and dtypes of its rows of `expected` (the
    output the module would have given) and checked against them by the Batcher."""
    batcher, total, dims = il.batcher, il.total, il.dims[OUTPUT][key[0]]
    checked = {}
    for mediator, (value, where) in skips.items():
        rows = mediator.rows
        own = (
            expected
            if rows is None
            else narrow_with(batcher, expected, rows, total, dims, il.expand)
        )
        text = f"{il.describe(key, mediator)} at {where} (skip)"
        value = conform(own, value, text)
        batcher.check_replacement(own, value, text)
        checked[mediator] = (value, where)
    return checked


def _expected_output(original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """What the module would return for the whole batch, with the shapes, dtypes and devices
    of its output (stand-ins built from `_SPECS`, or the fake run's own output where that
    cannot be cached); `MISSING` where the fake run fails."""
    module = getattr(original, "__self__", None)
    forward = getattr(original, "__func__", None)
    if not isinstance(module, torch.nn.Module):
        return MISSING
    key = None if forward is None else _key(module, forward, args, kwargs)
    spec = _NONE if key is None else _cached(key, module, forward)
    if spec is _NONE:
        output = _fake_forward(module, args, kwargs)
        spec = _spec_of(output)
        if spec is _NONE:
            return output
        if key is not None:
            _remember(key, module, forward, spec)
    return _stand_in(spec)


class _Unkeyable(Exception):
    """A value that the key of `_SPECS` cannot hold (its effect on the output is unknown)."""


def _key(module: torch.nn.Module, forward: Any, args: Any, kwargs: Any) -> Hashable | None:
    """The key of `_SPECS` for this call; None where the call cannot be cached."""
    if torch._C._is_any_autocast_enabled():
        return None
    state: list[Hashable] = []
    try:
        for sub in module.modules():
            state.append((type(sub), sub.training))
            for name, tensor in (*sub._parameters.items(), *sub._buffers.items()):
                state.append((name, None if tensor is None else _tensor_key(tensor)))
        inputs = _signature(args), _signature(kwargs)
    except _Unkeyable:
        return None
    return (
        id(module),
        id(forward),
        torch.get_default_dtype(),
        torch.get_default_device(),
        tuple(state),
        inputs,
    )


def _tensor_key(tensor: torch.Tensor) -> Hashable:
    if tensor.layout is not torch.strided:
        raise _Unkeyable
    return type(tensor), tensor.shape, tensor.stride(), tensor.dtype, tensor.device


def _signature(value: Any) -> Hashable:
    """The part of the key for one input: tensors by `_tensor_key`, constants by value."""
    kind = type(value)
    if isinstance(value, torch.Tensor):
        return _tensor_key(value)
    if kind in _CONSTANTS:
        return kind, value
    if isinstance(value, (tuple, list)):
        return kind, *(_signature(item) for item in value)
    if isinstance(value, dict):
        return kind, *((_signature(name), _signature(item)) for name, item in value.items())
    raise _Unkeyable


def _cached(key: Hashable, module: torch.nn.Module, forward: Any) -> Any:
    """The spec cached under `key` for this very module and forward; `_NONE` if none."""
    with _SPECS_LOCK:
        entry = _SPECS.get(key)
        if entry is None or entry[0]() is not module or entry[1]() is not forward:
            return _NONE
        _SPECS.move_to_end(key)
        return entry[2]


def _remember(key: Hashable, module: torch.nn.Module, forward: Any, spec: Any) -> None:
    try:
        entry = weakref.ref(module), weakref.ref(forward), spec
    except TypeError:  # a forward that takes no weak reference: not cached
        return
    with _SPECS_LOCK:
        _SPECS[key] = entry
        _SPECS.move_to_end(key)
        if len(_SPECS) > _SPECS_SIZE:
            _SPECS.popitem(last=False)


class _TensorSpec:
    """The shape, dtype and device of one tensor of an output (a leaf to `flatten`)."""

    __slots__ = ("shape", "dtype", "device")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device

    def stand_in(self) -> torch.Tensor:
        """A tensor of this shape, dtype and device whose elements all share one of storage."""
        strides = (0,) * len(self.shape)
        return torch.empty_strided(self.shape, strides, dtype=self.dtype, device=self.device)


def _spec_of(output: Any) -> Any:
    """`output` with each tensor replaced by its `_TensorSpec`; MISSING stays MISSING, and
    `_NONE` where it holds a leaf that is neither a tensor nor a constant."""
    if output is MISSING:
        return MISSING
    if isinstance(output, torch.Tensor):
        return _TensorSpec(output)
    leaves, rebuild = flatten(output)
    specs = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            specs.append(_TensorSpec(leaf))
        elif type(leaf) in _CONSTANTS:
            specs.append(leaf)
        else:
            return _NONE
    return rebuild(specs)


def _stand_in(spec: Any) -> Any:
    """A value of the structure, shapes, dtypes and devices that `spec` records."""
    if spec is MISSING:
        return MISSING
    if isinstance(spec, _TensorSpec):
        return spec.stand_in()
    leaves, rebuild = flatten(spec)
    return rebuild([leaf.stand_in() if isinstance(leaf, _TensorSpec) else leaf for leaf in leaves])


def _fake_forward(module: torch.nn.Module, args: Any, kwargs: Any) -> Any:
    """The output of the module's forward run by a copy of it on fake tensors (shapes, dtypes
    and devices, no data or compute), so that neither the module, its inputs nor the user's
    hooks see the run; `MISSING` where that fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # only here

    mode = FakeTensorMode()
    try:
        fake, (fake_args, fake_kwargs) = fake_copy(mode, module, (args, kwargs))
        quiet = _QuietThread(threading.get_ident())
        _FAKE_LOG.addFilter(quiet)  # a failure here is an answer ("unknown"), not an error
        try:
            with mode:
                return fake.forward(*fake_args, **fake_kwargs)
        finally:
            _FAKE_LOG.removeFilter(quiet)
    except Exception:  # noqa: BLE001 - not copyable, or not runnable on fake tensors
        return MISSING


_FAKE_LOG = logging.getLogger("torch._subclasses.fake_tensor")


class _QuietThread(logging.Filter):
    """Drops the log records of one thread (torch logs every op that fails on fake tensors)."""

    def __init__(self, ident: int) -> None:
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.ident


def fake_copy(mode: FakeTensorMode, module: torch.nn.Module, inputs: Any) -> tuple[Any, Any]:
    """A deep copy of `module` and `inputs` whose tensors are fake tensors of `mode` (shapes,
    strides, dtypes and devices, no data), the module stripped of taps and forward hooks."""
    from torch._subclasses.fake_tensor import FakeCopyMode  # only here

    memo = _fakes(mode, module, inputs)
    with FakeCopyMode(mode):  # any tensor `_fakes` left out: a subclass, an attribute
        fake, fake_inputs = copy.deepcopy((module, inputs), memo)
    strip(fake)
    return fake, fake_inputs


def _fakes(mode: FakeTensorMode, module: torch.nn.Module, inputs: Any) -> dict[int, Any]:
    """A `copy.deepcopy` memo that maps the module's parameters and buffers and the tensors of
    `inputs` (plain strided ones) to fake tensors of `mode` with their shapes, strides, dtypes
    and devices, made by a factory: `mode.from_tensor` would leave reference cycles."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for tensor in (*sub._parameters.values(), *sub._buffers.values()):
            _fake_into(memo, mode, tensor)
    for tensor in tensors(inputs):
        _fake_into(memo, mode, tensor)
    return memo


def _fake_into(memo: dict[int, Any], mode: FakeTensorMode, tensor: torch.Tensor | None) -> None:
    kind = type(tensor)
    if tensor is None or kind not in _PLAIN or tensor.layout is not torch.strided:
        return
    if id(tensor) not in memo:
        parameter = kind is torch.nn.Parameter
        with mode, torch.enable_grad():
            fake = torch.empty_strided(
                tensor.shape,
                tensor.stride(),
                dtype=tensor.dtype,
                device=tensor.device,
                requires_grad=tensor.requires_grad and not parameter,
            )
            if not tensor.is_leaf:  # computed with grad: so is its fake (in-place ops differ)
                fake = fake.clone()
        memo[id(tensor)] = torch.nn.Parameter(fake, tensor.requires_grad) if parameter else fake


def _join(
    il: Interleaver,
    key: Key,
    parts: list[tuple[slice, Any]],
    skips: dict[Mediator, tuple[Any, str]],
) -> Any:
    """The skip values joined by the Batcher; a ShapeError names the module, the call and the
    lines of the skips."""
    dims = il.dims[OUTPUT][key[0]]
    factor = _expansion(parts, dims, il.expand)
    total = il.total * factor
    if factor != 1:  # beam search: each invoke's value holds `factor` rows per batch row
        parts = [(slice(rows.start * factor, rows.stop * factor), value) for rows, value in parts]
    try:
        return join_with(il.batcher, parts, total, dims)
    except ShapeError as error:
        lines = "; ".join(
            f"rows {m.rows.start}:{m.rows.stop} at {where}"
            for m, (_, where) in skips.items()
            if m.rows is not None
        )
        raise ShapeError(f"{il.describe(key)}, skipped for {lines}: {error}") from None


def _constant(value: Any) -> Callable[[Any], Any]:
    return lambda old: value


def _new_lock_after_fork() -> None:
    global _SPECS_LOCK
    _SPECS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


def _expansion(parts: list[tuple[slice, Any]], dims: Dims, expand: tuple[int, ...]) -> int:
    """The factor of `expand` by which the skip values' batch dim holds more rows than their
    invokes (1 when there is none): told from the first value's first tensor."""
    if not expand or isinstance(dims, str):
        return 1
    rows, value = parts[0]
    leaf = next(iter(tensors(value)), None)
    dim = 0 if dims is None else dims[0]
    if leaf is None:
        return 1
    return rows_factor(leaf, dim, rows.stop - rows.start, expand, declared=False) or 1


def _refuse_cache_writes(
    il: Interleaver, key: Key, skips: dict[Mediator, tuple[Any, str]], args: Any, kwargs: Any
) -> None:
    """Raise UsageError if, during `generate`, the call some invokes skip is handed a KV cache:
    the others run it, which writes the skipping invokes' cache rows too, as none of their solo
    runs would, and the next steps read them. (In a single forward only the returned cache
    differs, which a skip changes anyway.)"""
    if not il.generating:
        return
    cache = next((v for v in (*args, *kwargs.values()) if is_cache(v)), None)
    if cache is None:
        return
    who = ", ".join(f"{m.label()} at {where}" for m, (_, where) in skips.items())
    raise UsageError(
        f"{il.describe(key)}: skipped by {who}, but not by every invoke, and during generate the "
        f"call is handed a {type(cache).__name__}: the invokes that run it would write the "
        "skipping invokes' rows of the cache too, which their solo runs never write and the "
        "next steps read. Skip it in every invoke, "
        "replace its output instead (.output = v: the call still runs and fills the cache, as "
        "alone), or trace the skipping invoke alone"
    )
