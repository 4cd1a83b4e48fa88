"""Batching for causal language models: prompts of different lengths in one batch.

Each invoke passes its tokens (`input_ids` `[T]` or `[n, T]`, positionally or by keyword, or
`inputs_embeds` `[n, T, d]`) and maybe an `attention_mask`, `labels` and `position_ids` of the
same length; inputs passed positionally after the tokens are named by the traced method's
parameters. Prompts are padded on the left to the longest one (pad tokens or zero embeddings,
zeros in the mask, ignored labels), so the last position is every prompt's last real token and
generation continues all of them in step. Each invoke's real tokens compute what they compute
alone, also with its own left or right padding: for a forward pass each row gets the position
ids it has alone (`generate` computes them from the mask itself), and with `labels` each invoke
reads its own loss (`_lm_loss.py`). Values an invoke reads keep the left padding of its rows:
position `-1` is always its last token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._batcher import Batcher, Inputs
from ._layouts import Dims
from ._lm_inputs import Prompt, check_alike, keyword_inputs, normalise, pad
from ._lm_loss import LossFunction, PerInvokeLoss, next_token_loss

_POSITIONS = ("mask", "columns")


class CausalLMBatcher(Batcher):
    """Left-pads the prompts of invokes of different lengths; each invoke computes what it
    computes alone.

    `mediator.Model` picks it for Hugging Face style causal language models (a `config` and a
    `generate` method), with the config's pad token (else its end-of-sequence token, else 0),
    the model's way of numbering positions and its loss function. Pass one yourself to choose:

    - `pad_token_id`: the token that pads shorter prompts (masked out, so any token will do);
    - `position_ids=False` for a model whose forward takes no `position_ids`;
    - `positions`: how the model numbers a row's positions when it is given no `position_ids`:
      `"columns"` counts its columns from the first (Hugging Face transformers 5 models such as
      GPT-2 and Llama, so a prompt's own left padding counts), `"mask"` counts its real tokens
      (OPT, `mediator.models.TinyLM`). Each row gets the positions it has alone;
    - `loss(logits, labels)`: the loss of an invoke's rows when invokes pass `labels` (default:
      the mean next-token cross-entropy over labels other than -100, as Hugging Face computes).

    Each invoke passes `input_ids` (`[T]` or `[n, T]`) or `inputs_embeds` (`[n, T, d]`), and
    maybe `attention_mask`, `labels` and `position_ids`, and reads its values with its left
    padding: position `-1` is its last token. With `labels`, `model.output.loss` in an invoke is
    that invoke's own loss (its gradient flows through its rows only).

    Example:

        model = mediator.Model(net, batcher=mediator.CausalLMBatcher(pad_token_id=0))
        with model.trace() as tr:
            with tr.invoke(tokenizer("The cat", return_tensors="pt").input_ids):
                short = model.lm_head.output[:, -1]     # the last real token's logits
            with tr.invoke(ids := tokenizer("A longer prompt here", return_tensors="pt").input_ids,
                           labels=ids):
                loss = model.output.loss                # this prompt's loss alone
    """

    def __init__(
        self,
        pad_token_id: int = 0,
        position_ids: bool = True,
        positions: str = "mask",
        loss: LossFunction | None = None,
    ) -> None:
        if positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {_POSITIONS}, got {positions!r}")
        self.pad_token_id = pad_token_id
        self.position_ids = position_ids  # whether the model's forward takes `position_ids`
        self.positions = positions
        self.loss = loss or next_token_loss

    def name_inputs(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Inputs:
        """Positional inputs after the tokens passed by their names in `call`'s signature, so
        that `tr.invoke(ids, mask)` is padded like `tr.invoke(ids, attention_mask=mask)`.

        Example:

            batcher.name_inputs(net.forward, (ids, mask), {})
            # ((ids,), {"attention_mask": mask}) for a forward(input_ids, attention_mask, ...)
        """
        return keyword_inputs(call, args, kwargs)

    def batch(
        self, inputs: list[Inputs | None], generate: bool = False, dims: Dims = None
    ) -> tuple[Inputs, list[slice | None], int]:
        """Batch the invokes' prompts, left-padding them to the longest one when they differ in
        length or in the inputs they pass; for a forward pass (not `generate`) also add each
        row's own `position_ids`. `dims` is passed on to `Batcher.batch`, whose return value
        this is; raises ShapeError naming the invoke and the input for inputs that cannot be
        batched (token ids in one invoke and embeddings in another, a per-token input of another
        length than its tokens).

        Example:

            batcher = mediator.CausalLMBatcher(pad_token_id=0)
            (args, kwargs), rows, total = batcher.batch(
                [((torch.tensor([[5, 6, 7]]),), {}), ((torch.tensor([[8, 9]]),), {})]
            )
            # kwargs["input_ids"] == [[5, 6, 7], [0, 8, 9]]
            # kwargs["attention_mask"] == [[1, 1, 1], [0, 1, 1]]
            # kwargs["position_ids"] == [[0, 1, 2], [0, 0, 1]]
        """
        prompts = [None if entry is None else normalise(entry, i) for i, entry in enumerate(inputs)]
        given = [prompt for prompt in prompts if prompt is not None]
        if len(given) < 2 or _alike(given):
            return super().batch([_unpadded(p) for p in prompts], generate, dims)
        check_alike(given)
        longest = max(prompt.length for prompt in given)
        positions = self.positions if self.position_ids and not generate else None
        labels = any("labels" in prompt.per_token for prompt in given)
        padded = [
            None if prompt is None else pad(prompt, longest, self.pad_token_id, positions, labels)
            for prompt in prompts
        ]
        return super().batch(padded, generate, dims)

    def for_run(self, batched: Inputs) -> Batcher:
        """With `labels` in the batch, a batcher that gives each invoke its own loss.

        Example:

            run_batcher = batcher.for_run(batched)   # narrows model.output.loss per invoke
        """
        labels = batched[1].get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2:
            return PerInvokeLoss(self, labels, self.loss)
        return self


def _alike(prompts: list[Prompt]) -> bool:
    """Whether the prompts concatenate as they are: same tokens kind, length and inputs."""
    first = prompts[0]
    return all(
        prompt.key == first.key
        and prompt.length == first.length
        and prompt.per_token.keys() == first.per_token.keys()
        for prompt in prompts
    )


def _unpadded(prompt: Prompt | None) -> Inputs | None:
    return None if prompt is None else prompt.inputs()
