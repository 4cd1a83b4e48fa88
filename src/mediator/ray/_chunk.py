"""One chunk of experiments as one trace, each item's error kept with its item (no Ray here).

A Ray worker (a sweep's actor, or a serving replica) calls `run_chunk` with its model and a list of
`(experiment, item)` calls: one function invoke per call, all in one batched forward pass. An
experiment that raises is caught in its own invoke, so the others go on in the same forward. If the
trace fails as a whole anyway (the model raises, inputs that cannot be batched together), every
call of the chunk runs again alone, so each result is what its solo trace gives. Results are made
ready to leave the process: a tensor that is a view of a larger batch tensor is copied, so only its
own rows travel. This file owns no state.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._envoy import Model
from .._tree import flatten

Experiment = Callable[[Model, Any], Any]
Call = tuple[Experiment, Any]  # (experiment, item): `experiment(model, item)` in one invoke


class SweepError(Exception):
    """The error of one item of a sweep (or one served request): a result, not raised.

    `index` is the item's position in the sweep's items, `error` the exception its experiment (or
    its solo trace) raised, `traceback` that exception's traceback as text, formatted where it was
    raised (on the worker). Test a result with `isinstance(result, SweepError)`.

    Example:

        for index, result in enumerate(mediator.ray.sweep(load, experiment, items)):
            if isinstance(result, mediator.ray.SweepError):
                print(f"item {result.index} failed:", result.error)
                print(result.traceback)
    """

    def __init__(self, index: int, error: BaseException, traceback: str) -> None:
        super().__init__(f"item {index}: {type(error).__name__}: {error}")
        self.index = index
        self.error = error
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (SweepError, (self.index, self.error, self.traceback))


def as_model(loaded: Any) -> Model:
    """`load_model()`'s result as a `Model`: a `Model` itself, or the module it wraps."""
    if isinstance(loaded, Model):
        return loaded
    if isinstance(loaded, nn.Module):
        return Model(loaded)
    raise TypeError(
        f"load_model() returned {type(loaded).__name__}; return a mediator.Model or the "
        "torch.nn.Module to wrap"
    )


def run_chunk(
    model: Model, calls: Sequence[Call], first_index: int = 0, grad: bool = False
) -> list[Any]:
    """`experiment(model, item)` for each call, as invokes of one trace: the results in order,
    a `SweepError` (indexed from `first_index`) where an experiment raised."""
    with torch.set_grad_enabled(grad):
        try:
            outcomes = _one_trace(model, calls)
        except Exception:  # the trace failed as a whole: each call alone gives its own result
            outcomes = [_solo(model, call) for call in calls]
    return [
        _failure(first_index + offset, outcome[1]) if outcome[0] else _portable(outcome[1])
        for offset, outcome in enumerate(outcomes)
    ]


def _one_trace(model: Model, calls: Sequence[Call]) -> list[tuple[bool, Any]]:
    with model.trace() as tracer:
        futures = [_invoke(tracer, model, call) for call in calls]
    return [_outcome(future) for future in futures]


def _solo(model: Model, call: Call) -> tuple[bool, Any]:
    try:
        with model.trace() as tracer:
            future = _invoke(tracer, model, call)
    except Exception as error:
        return True, error
    return _outcome(future)


def _outcome(future: Any) -> tuple[bool, Any]:
    """(failed, value) of a function invoke that ran (one the model never reached fails)."""
    try:
        result: tuple[bool, Any] = future.result()
    except Exception as error:
        return True, error
    return result


def _invoke(tracer: Any, model: Model, call: Call) -> Any:
    """One function invoke for `call`; a dict item is the invoke's keyword inputs."""
    experiment, item = call
    invoke = tracer.invoke(**item) if isinstance(item, dict) else tracer.invoke(item)
    return invoke.run(_guarded, experiment, model, item)


def _guarded(experiment: Experiment, model: Model, item: Any) -> tuple[bool, Any]:
    """(failed, value): the experiment's result, or the exception it raised, which then ends
    only this invoke (the body returns; the forward goes on for the others)."""
    try:
        return False, experiment(model, item)
    except Exception as error:
        return True, error


def _failure(index: int, error: BaseException) -> SweepError:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        pickle.dumps(error)
    except Exception:  # it must travel back to the driver: keep what it said
        error = RuntimeError(f"{type(error).__name__}: {error} (the original could not be pickled)")
    error.__traceback__ = None  # the text keeps it; frames would keep the trace's values alive
    return SweepError(index, error, text)


def _portable(value: Any) -> Any:
    """`value` with every tensor that views a larger storage (an invoke's rows of the batch)
    copied, so that sending it sends only its own elements."""
    leaves, rebuild = flatten(value)
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        return value
    return rebuild([_compact(leaf) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves])


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()  # a graph does not leave the process
    if tensor.untyped_storage().nbytes() > tensor.nelement() * tensor.element_size():
        return tensor.clone()
    return tensor
