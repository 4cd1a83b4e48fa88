"""Each invoke's own loss when a causal language model is given `labels`.

A Hugging Face causal LM given `labels` returns one `loss`, the mean over every labelled token
of the batch: it has no rows to narrow. `PerInvokeLoss` is the batcher of one such run: an
invoke reading the model's output gets the loss of its own rows, computed from its logits and
its labels by the model's loss function, so its value and its gradient are those of a solo run.
The full output (an invoke without inputs, `tr.result`) keeps the batch's loss. This module owns
no state beyond one run's labels.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional

from ._batcher import Batcher, Inputs, join_with, merge_with, narrow_with
from ._layouts import Dims
from ._lm_inputs import IGNORE_INDEX

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of each position's logits against the next position's label,
    over the labels that are not -100: the loss of Hugging Face causal language models.

    Example:

        loss = next_token_loss(model_output.logits, input_ids)   # a 0-dim tensor
    """
    predictions = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten().to(logits.device)
    return functional.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX)


class PerInvokeLoss(Batcher):
    """The batcher of one run with `labels`: `batcher`'s narrowing, with each invoke's own loss.

    Example:

        run_batcher = PerInvokeLoss(CausalLMBatcher(), labels, next_token_loss)
        own = run_batcher.narrow(output, slice(0, 1), total=2)   # own.loss: rows 0:1 only
    """

    def __init__(self, batcher: Batcher, labels: torch.Tensor, loss: LossFunction) -> None:
        self.batcher = batcher
        self.labels = labels
        self.loss = loss

    def narrow(
        self, value: Any, rows: slice, total: int, dims: Dims = None, expand: tuple[int, ...] = ()
    ) -> Any:
        """`value` narrowed to `rows`; a model output holding a loss gets the loss of `rows`
        (None for an invoke that passed no labels)."""
        if not _holds_loss(value, total):
            return narrow_with(self.batcher, value, rows, total, dims, expand)
        own = narrow_with(self.batcher, _without_loss(value), rows, total, dims, expand)
        labels = self.labels[rows]
        labelled = bool((labels[:, 1:] != IGNORE_INDEX).any())
        return _with_loss(own, self.loss(own["logits"], labels) if labelled else None)

    def merge(
        self,
        full: Any,
        views: list[tuple[slice, Any]],
        total: int,
        dims: Dims = None,
        expand: tuple[int, ...] = (),
    ) -> Any:
        """`batcher.merge`; the merged output keeps the batch's loss, not an invoke's."""
        if _holds_loss(full, total):
            views = [(rows, _with_loss(view, full["loss"])) for rows, view in views]
        return merge_with(self.batcher, full, views, total, dims, expand)

    def batch(
        self, inputs: list[Inputs | None], generate: bool = False, dims: Dims = None
    ) -> tuple[Inputs, list[slice | None], int]:
        return self.batcher.batch(inputs, generate, dims)

    def join(self, parts: list[tuple[slice, Any]], total: int, dims: Dims = None) -> Any:
        return join_with(self.batcher, parts, total, dims)

    def check_replacement(self, old: Any, new: Any, where: str) -> None:
        self.batcher.check_replacement(old, new, where)


def _holds_loss(value: Any, total: int) -> bool:
    """Whether `value` is a model output (a dict, as `ModelOutput` is) with a batch loss and
    the batch's logits."""
    if not isinstance(value, dict):
        return False
    loss, logits = value.get("loss"), value.get("logits")
    return (
        isinstance(loss, torch.Tensor)
        and loss.dim() == 0
        and isinstance(logits, torch.Tensor)
        and logits.dim() > 0
        and logits.shape[0] == total
    )


def _without_loss(value: dict[str, Any]) -> Any:
    return _with_loss(value, None)


def _with_loss(value: Any, loss: torch.Tensor | None) -> Any:
    """`value` with `loss` as its loss. A `ModelOutput` is rebuilt through its dataclass, so its
    entries keep the order of its fields (a copy with an entry set anew would put it last, and
    the invokes' views would no longer line up with the batch's output)."""
    if not isinstance(value, dict):
        return value
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, loss=loss)
    if "loss" not in value:
        return value
    new = copy.copy(value)
    new["loss"] = loss
    return new
