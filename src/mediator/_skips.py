"""Calls that invokes skip (`.skip(v)`): the skipped rows get the invokes' own values.

When some rows skip, the module runs and each skipping invoke's rows are replaced. When every
row skips, the module does not run at all; its output is then the skip values joined by the
Batcher, and each value is first checked against its rows of the output the module would have
given: a copy of the module runs its forward on fake tensors (shapes, dtypes and devices, no data
or compute), so neither the module, its inputs nor the user's hooks see that run. This module
owns no state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ._boundary import Boundary
from ._errors import ShapeError
from ._interrupts import model_call_site
from ._protocol import OUTPUT, Key
from ._tap import strip

if TYPE_CHECKING:
    from ._interleaver import Interleaver
    from ._mediator import Mediator

MISSING: Any = object()


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
    whole = [value for mediator, (value, _) in skips.items() if mediator.rows is None]
    parts = sorted(
        ((m.rows, value) for m, (value, _) in skips.items() if m.rows is not None),
        key=lambda part: part[0].start,
    )
    if not whole and sum(rows.stop - rows.start for rows, _ in parts) < il.total:
        partial = Boundary(il, key, original(*args, **kwargs))
        for mediator, (value, where) in skips.items():
            partial.swap(mediator, _constant(value), f"{where} (skip)")
        return partial.merged()
    batcher, total = il.batcher, il.total
    expected = _expected_output(original, args, kwargs)
    output = whole[0] if whole else MISSING
    if expected is MISSING:  # check at least rows and structure: against the joined values
        if output is MISSING:
            output = _join(il, key, parts, skips)
        expected = output
    for mediator, (value, where) in skips.items():
        rows = mediator.rows
        own = expected if rows is None else batcher.narrow(expected, rows, total)
        batcher.check_replacement(own, value, f"{il.describe(key)} at {where} (skip)")
    return _join(il, key, parts, skips) if output is MISSING else output


def _expected_output(original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """What the module would return for the whole batch: its forward run by a copy of it on
    fake tensors (shapes, dtypes and devices, no data or compute), so that neither the
    module, its inputs nor the user's hooks see the run; `MISSING` where that fails."""
    module = getattr(original, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        return MISSING
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode  # only here

    mode = FakeTensorMode()
    try:
        with FakeCopyMode(mode):
            fake, fake_args, fake_kwargs = copy.deepcopy((module, args, kwargs))
        strip(fake)
        with mode:
            return fake.forward(*fake_args, **fake_kwargs)
    except Exception:  # noqa: BLE001 - not copyable, or not runnable on fake tensors
        return MISSING


def _join(
    il: Interleaver,
    key: Key,
    parts: list[tuple[slice, Any]],
    skips: dict[Mediator, tuple[Any, str]],
) -> Any:
    """The skip values joined by the Batcher; a ShapeError names the module, the call and the
    lines of the skips."""
    try:
        return il.batcher.join(parts, il.total)
    except ShapeError as error:
        lines = "; ".join(
            f"rows {m.rows.start}:{m.rows.stop} at {where}"
            for m, (_, where) in skips.items()
            if m.rows is not None
        )
        raise ShapeError(f"{il.describe(key)}, skipped for {lines}: {error}") from None


def _constant(value: Any) -> Callable[[Any], Any]:
    return lambda old: value
