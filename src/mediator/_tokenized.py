"""Text and token lists as inputs of a `LanguageModel`: tokenized, padded, named.

`TextBatcher` is the `CausalLMBatcher` of a `LanguageModel`. An invoke's first input may be a
string, a list of strings (one row each), token ids (a list of ints, a list of rows of any
lengths, a tensor), or a `BatchEncoding`/dict holding `input_ids` (and maybe `attention_mask`);
it becomes `input_ids` and `attention_mask`, rows of different lengths left-padded as prompts of
different invokes are (`_lm_inputs.pad`), on the device of the model's token embeddings
(`device`; tensors the user passes stay where they are). For a forward pass, rows with padding
also get the position ids they have alone, so that every row computes what its prompt computes
unpadded; `generate` numbers positions over the mask itself, and gets rows padded on the right
(a tokenizer's default) padded on the left, since it continues each row after its last position.
State: each batcher's tokenizer
(or why there is none) and input device, which its `LanguageModel` sets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._batcher import Inputs
from ._causal_lm import CausalLMBatcher
from ._errors import UsageError
from ._lm_inputs import normalise, pad, solo_positions
from ._tree import describe

_ACCEPTED = (
    "a string, a list of strings (one row each), token ids (a list of ints, a list of lists, "
    "a tensor) or a BatchEncoding/dict with input_ids (and attention_mask)"
)


class TextBatcher(CausalLMBatcher):
    """A `CausalLMBatcher` that also takes text and token lists, and tokenizes with `tokenizer`.

    `LanguageModel` makes one; `lm.tokenizer` is its tokenizer. `missing` says why there is
    no tokenizer, for the error raised when text is given without one.

    Example:

        batcher = TextBatcher.like(mediator.CausalLMBatcher(pad_token_id=0), tokenizer)
        args, kwargs = batcher.name_inputs(net.forward, (["Hello", "A longer prompt"],), {})
        # args[0]: the ids, left-padded; kwargs: attention_mask and position_ids
    """

    def __init__(self, tokenizer: Any, missing: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.tokenizer = tokenizer
        self.missing = missing
        self.device: torch.device | None = None  # where the tensors it makes go (see `encode`)

    @classmethod
    def like(cls, batcher: CausalLMBatcher, tokenizer: Any, missing: str | None = None) -> Any:
        """A TextBatcher that pads, numbers positions and computes losses as `batcher` does.

        Example:

            text = TextBatcher.like(mediator.CausalLMBatcher(pad_token_id=2), tokenizer)
        """
        return cls(
            tokenizer,
            missing,
            pad_token_id=batcher.pad_token_id,
            position_ids=batcher.position_ids,
            positions=batcher.positions,
            loss=batcher.loss,
        )

    def name_inputs(
        self, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Inputs:
        """`CausalLMBatcher.name_inputs` after turning a first input that is text, a list of
        token ids or a mapping into `input_ids` and `attention_mask`; for a forward pass (not
        `generate`) rows with padding get the position ids they have alone.

        Example:

            batcher.name_inputs(net.forward, ("The Eiffel Tower is in",), {})
            # ((ids [1, T],), {"attention_mask": ones [1, T]})
        """
        if args and not isinstance(args[0], torch.Tensor):
            encoded = {name: self._placed(value) for name, value in self.encode(args[0]).items()}
            tokens = encoded.pop("input_ids", None)
            args = args[1:] if tokens is None else (tokens, *args[1:])
            kwargs = {**encoded, **kwargs}
        args, kwargs = super().name_inputs(call, args, kwargs)
        if getattr(call, "__name__", None) == "generate":
            return _padded_on_the_left(args, kwargs)
        if self.position_ids:
            kwargs = _with_solo_positions(kwargs)
        return args, kwargs

    def encode(self, value: Any) -> dict[str, Any]:
        """`value` (any input form but a tensor) as keyword inputs: `input_ids` and
        `attention_mask` for text and token lists, the mapping's items (padded) for a mapping.

        Example:

            batcher.encode(["Hello", "A longer prompt"])
            # {"input_ids": [2, T] left-padded, "attention_mask": [2, T]}
        """
        if isinstance(value, str):
            return self._padded(self._tokenize([value]), None)
        if isinstance(value, Mapping):
            return self._mapping(value)
        if isinstance(value, (list, tuple)) and value:
            if all(isinstance(item, str) for item in value):
                return self._padded(self._tokenize(value), None)
            if all(_is_token(item) for item in value):
                return {"input_ids": torch.tensor([list(value)], dtype=torch.long)}
            if all(_is_row(item) for item in value):
                return self._padded(list(value), None)
        raise TypeError(f"a language model's input is {_ACCEPTED}; got {describe(value)}")

    def _placed(self, value: Any) -> Any:
        """A tensor made from text or token lists, on the model's input device (if known)."""
        if self.device is None or not isinstance(value, torch.Tensor):
            return value
        return value.to(self.device)

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if self.tokenizer is None:
            raise UsageError(
                f"text was given but this LanguageModel has no tokenizer ({self.missing}); "
                "pass one, mediator.LanguageModel(..., tokenizer=tokenizer), or pass token ids"
            )
        ids: list[list[int]] = self.tokenizer(list(texts))["input_ids"]
        return ids

    def _mapping(self, value: Mapping[str, Any]) -> dict[str, Any]:
        items = dict(value)
        ids = items.get("input_ids")
        if isinstance(ids, (list, tuple)) and ids and all(_is_row(row) for row in ids):
            items.update(self._padded(list(ids), items.get("attention_mask")))
        return items

    def _padded(self, rows: list[Any], masks: Any) -> dict[str, Any]:
        """Rows of token ids (and their masks) left-padded to the longest, as `pad` pads the
        prompts of invokes: `input_ids` and `attention_mask`, `[rows, longest]`."""
        prompts = []
        for index, row in enumerate(rows):
            ids = torch.as_tensor(row, dtype=torch.long).reshape(1, -1)
            if ids.shape[1] == 0:
                raise ValueError(f"row {index} of a language model's input has no tokens")
            per_token = {} if masks is None else {"attention_mask": masks[index]}
            prompts.append(normalise(((ids,), per_token), index))
        longest = max(prompt.length for prompt in prompts)
        padded = [pad(prompt, longest, self.pad_token_id, None, False)[1] for prompt in prompts]
        return {
            name: torch.cat([row[name] for row in padded])
            for name in ("input_ids", "attention_mask")
        }


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_row(value: Any) -> bool:
    """A row of token ids: a list or tuple of ints, or a tensor of at most one dimension."""
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 and not value.is_floating_point()
    return isinstance(value, (list, tuple)) and all(_is_token(item) for item in value)


def _padded_on_the_left(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Inputs:
    """For `generate`, which continues every row after its last position: rows that a mask pads
    on the right (a tokenizer's default) with their padding moved to the left, the order of
    their tokens kept; per-token inputs (the tokens, the mask, ...) move with them."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask[:, -1].all()):
        return args, kwargs
    order = torch.sort((mask != 0).to(torch.int8), dim=1, stable=True).indices

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape == mask.shape:
            return value.gather(1, order.to(value.device))
        return value

    return tuple(moved(value) for value in args), {
        name: moved(value) for name, value in kwargs.items()
    }


def _with_solo_positions(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with the position ids each row has alone, where its mask pads some rows."""
    mask = kwargs.get("attention_mask")
    if mask is None or "position_ids" in kwargs or "past_key_values" in kwargs:
        return kwargs
    mask = torch.as_tensor(mask)
    if mask.dim() != 2 or bool(mask.all()):
        return kwargs
    return {**kwargs, "position_ids": solo_positions(mask, "mask")}
