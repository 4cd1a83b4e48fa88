"""Batching for causal language models: prompts of different lengths in one batch.

Each invoke passes `input_ids` (positionally or by keyword; shape `[T]` or `[n, T]`) and maybe an
`attention_mask`. Prompts are padded on the left to the longest one, with the model's pad token
and zeros in the attention mask, so the last position is every prompt's last real token and
generation continues all of them in step. For a plain forward pass (`model.trace`) the position
ids are computed from the mask, so each invoke's real tokens get the logits a solo run of its
prompt gets; `generate` computes them itself. Values an invoke reads keep the left padding of its
rows: position `-1` is always its last token.
"""

from __future__ import annotations

from typing import Any

import torch

from ._batcher import Batcher, Inputs
from ._errors import ShapeError
from ._layouts import Dims


class CausalLMBatcher(Batcher):
    """Left-pads `input_ids` and `attention_mask` of invokes with different prompt lengths.

    `mediator.Model` picks it for Hugging Face style causal language models (a `config` and a
    `generate` method), with the config's pad token (else its end-of-sequence token, else 0).
    Pass one yourself to choose the pad token, or `position_ids=False` for a model whose forward
    takes no `position_ids`. Each invoke passes `input_ids` (`[T]` or `[n, T]`) and maybe an
    `attention_mask`, and reads its values with its left padding: position `-1` is its last
    token.

    Example:

        model = mediator.Model(net, batcher=mediator.CausalLMBatcher(pad_token_id=0))
        with model.trace() as tr:
            with tr.invoke(tokenizer("The cat", return_tensors="pt").input_ids):
                short = model.lm_head.output[:, -1]     # the last real token's logits
            with tr.invoke(tokenizer("A longer prompt here", return_tensors="pt").input_ids):
                long = model.lm_head.output[:, -1]
    """

    def __init__(self, pad_token_id: int = 0, position_ids: bool = True) -> None:
        self.pad_token_id = pad_token_id
        self.position_ids = position_ids  # whether the model's forward takes `position_ids`

    def batch(
        self, inputs: list[Inputs | None], generate: bool = False, dims: Dims = None
    ) -> tuple[Inputs, list[slice | None], int]:
        """Batch the invokes' prompts, left-padding them to the longest one when lengths differ
        or a mask is given; for a forward pass (not `generate`) also add `position_ids` computed
        from the mask, so each prompt gets the positions of a solo run. `dims` is passed on to
        `Batcher.batch`, whose return value this is.

        Example:

            batcher = mediator.CausalLMBatcher(pad_token_id=0)
            (args, kwargs), rows, total = batcher.batch(
                [((torch.tensor([[5, 6, 7]]),), {}), ((torch.tensor([[8, 9]]),), {})]
            )
            # kwargs["input_ids"] == [[5, 6, 7], [0, 8, 9]]
            # kwargs["attention_mask"] == [[1, 1, 1], [0, 1, 1]]
            # kwargs["position_ids"] == [[0, 1, 2], [0, 0, 1]]
        """
        prompts = [
            None if entry is None else self._normalise(entry, i) for i, entry in enumerate(inputs)
        ]
        given = [entry for entry in prompts if entry is not None]
        lengths = {entry[1]["input_ids"].shape[1] for entry in given}
        masked = any("attention_mask" in entry[1] for entry in given)
        if len(given) < 2 or (len(lengths) == 1 and not masked):
            return super().batch(prompts, generate, dims)
        for index, entry in enumerate(prompts):
            if entry is not None and any(isinstance(arg, torch.Tensor) for arg in entry[0]):
                raise ShapeError(
                    f"invoke {index} passes a tensor as a positional argument after input_ids; "
                    "prompts of different lengths are left-padded, which is done for input_ids "
                    "and for an attention_mask given by keyword: pass "
                    "tr.invoke(input_ids, attention_mask=mask)"
                )
        longest = max(lengths)
        padded = [None if entry is None else self._pad(entry, longest) for entry in prompts]
        (args, kwargs), rows, total = super().batch(padded, generate, dims)
        if self.position_ids and not generate and "position_ids" not in kwargs:
            mask = kwargs["attention_mask"]
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return (args, kwargs), rows, total

    def _normalise(self, entry: Inputs, index: int) -> Inputs:
        args, kwargs = entry
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs:
                raise ShapeError(f"invoke {index} passes input_ids both by position and keyword")
            kwargs["input_ids"], args = args[0], args[1:]
        if "input_ids" not in kwargs:
            raise ShapeError(
                f"invoke {index} passes no input_ids: a causal language model takes token ids, "
                "e.g. tr.invoke(tokenizer(text, return_tensors='pt').input_ids)"
            )
        for name in ("input_ids", "attention_mask"):
            if name in kwargs:
                value = torch.as_tensor(kwargs[name])
                kwargs[name] = value.unsqueeze(0) if value.dim() == 1 else value
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ShapeError(
                f"invoke {index}: attention_mask has shape {list(mask.shape)} but input_ids has "
                f"{list(ids.shape)}; they must match"
            )
        return tuple(args), kwargs

    def _pad(self, entry: Inputs, length: int) -> Inputs:
        args, kwargs = entry
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        missing = length - ids.shape[1]
        if missing:
            rows = ids.shape[0]
            ids = torch.cat([ids.new_full((rows, missing), self.pad_token_id), ids], dim=1)
            mask = torch.cat([mask.new_zeros((rows, missing)), mask], dim=1)
        padded: dict[str, Any] = {**kwargs, "input_ids": ids, "attention_mask": mask}
        return args, padded
