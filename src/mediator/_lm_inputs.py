"""One causal-LM invoke's inputs, named, shaped and padded for a batch of prompts.

An invoke passes its tokens (`input_ids` `[n, T]`, or `inputs_embeds` `[n, T, d]`) and maybe
per-token inputs (`attention_mask`, `labels`, `position_ids`, each `[n, T]`). `keyword_inputs`
names positional inputs after the tokens by the traced method's parameters; `normalise` checks
and shapes an invoke's inputs into a `Prompt`; `pad` left-pads a prompt to the batch's longest
so that each row computes what it computes alone: padding is masked out, labels of padding are
ignored, and position ids are the row's own. This module owns one state: a weak cache of each
traced method's parameter names.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._batcher import Inputs
from ._errors import ShapeError
from ._tree import describe

TOKENS = ("input_ids", "inputs_embeds")
PER_TOKEN = ("attention_mask", "labels", "position_ids")
IGNORE_INDEX = -100  # a label that takes no part in the loss (Hugging Face and torch default)

_PARAMETERS: weakref.WeakKeyDictionary[Any, tuple[str, ...] | None] = weakref.WeakKeyDictionary()
_NAMEABLE = inspect.Parameter.POSITIONAL_OR_KEYWORD


def keyword_inputs(
    call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Inputs:
    """`(args, kwargs)` with the positional inputs after the first passed by their names in
    `call`'s signature (`tr.invoke(ids, mask)` is `tr.invoke(ids, attention_mask=mask)` for a
    forward `(input_ids, attention_mask, ...)`); unchanged where they cannot be named."""
    if len(args) < 2:
        return args, kwargs
    names = _parameter_names(call)
    if names is None or len(names) < len(args):
        return args, kwargs
    named = dict(zip(names[1 : len(args)], args[1:], strict=True))
    if "" in named or set(named) & set(kwargs):
        return args, kwargs
    return args[:1], {**named, **kwargs}


def _parameter_names(call: Callable[..., Any]) -> tuple[str, ...] | None:
    """The names of `call`'s positional parameters in order ("" for one that cannot be passed
    by keyword), cached per function; None where it has no signature."""
    function = getattr(call, "__func__", call)
    try:
        return _PARAMETERS[function]
    except KeyError:
        pass
    except TypeError:  # not weakly referable: look it up every time
        return _signature_names(call)
    names = _PARAMETERS[function] = _signature_names(call)
    return names


def _signature_names(call: Callable[..., Any]) -> tuple[str, ...] | None:
    try:
        parameters = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, _NAMEABLE)
    return tuple(p.name if p.kind is _NAMEABLE else "" for p in parameters if p.kind in positional)


@dataclass
class Prompt:
    """One invoke's inputs: its tokens, its per-token inputs, and everything else."""

    index: int
    args: tuple[Any, ...]  # positional inputs after the tokens (not named by the signature)
    kwargs: dict[str, Any]  # keyword inputs other than the tokens and per-token ones
    key: str  # "input_ids" or "inputs_embeds"
    tokens: torch.Tensor  # [n, T] ids or [n, T, d] embeddings
    per_token: dict[str, torch.Tensor]  # [n, T] each

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def inputs(self) -> Inputs:
        """The prompt as the model takes it, unpadded."""
        return self.args, {**self.kwargs, self.key: self.tokens, **self.per_token}


def normalise(entry: Inputs, index: int) -> Prompt:
    """Invoke `index`'s inputs as a `Prompt`: tokens by keyword, `[T]` made `[1, T]`; raises
    ShapeError for tokens passed twice or not at all, and per-token inputs of another shape."""
    args, kwargs = entry
    kwargs = dict(kwargs)
    if args:
        for key in TOKENS:
            if key in kwargs:
                raise ShapeError(
                    f"invoke {index} passes tokens both by position and as {key}=; pass them once",
                    invokes=(index,),
                )
        kwargs["input_ids"], args = args[0], args[1:]
    keys = [key for key in TOKENS if kwargs.get(key) is not None]
    if len(keys) != 1:
        found = "both input_ids and inputs_embeds" if keys else "no input_ids or inputs_embeds"
        raise ShapeError(
            f"invoke {index} passes {found}: a causal language model takes one of them, e.g. "
            "tr.invoke(tokenizer(text, return_tensors='pt').input_ids) or "
            "tr.invoke(inputs_embeds=embeddings)",
            invokes=(index,),
        )
    key = keys[0]
    tokens = _with_rows(kwargs.pop(key), 2 if key == "input_ids" else 3, key, index)
    per_token = {}
    for name in PER_TOKEN:
        value = kwargs.pop(name, None)
        if value is not None:
            per_token[name] = _per_token(value, tokens, name, key, index)
    return Prompt(index, tuple(args), kwargs, key, tokens, per_token)


def _with_rows(value: Any, rank: int, name: str, index: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dim() == rank - 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != rank:
        shape = "[n, T]" if rank == 2 else "[n, T, hidden]"
        hint = "; pass embeddings as inputs_embeds=" if name == "input_ids" else ""
        raise ShapeError(
            f"invoke {index}: {name} is {describe(value)}, expected {shape}{hint}",
            invokes=(index,),
        )
    return tensor


def _per_token(value: Any, tokens: torch.Tensor, name: str, key: str, index: int) -> torch.Tensor:
    tensor = _with_rows(value, 2, name, index)
    rows, length = tokens.shape[:2]
    if name == "position_ids" and tensor.shape == (1, length):
        tensor = tensor.expand(rows, length)  # one row of positions for every prompt
    if tensor.shape != tokens.shape[:2]:
        raise ShapeError(
            f"invoke {index}: {name} has shape {list(tensor.shape)} but {key} has "
            f"{list(tokens.shape)}; they must match in their first two dimensions",
            invokes=(index,),
        )
    return tensor


def check_alike(prompts: list[Prompt]) -> None:
    """Raise ShapeError unless every prompt passes the same kind of tokens, and none passes a
    tensor positionally that could not be named (it would stay unpadded)."""
    first = prompts[0]
    for prompt in prompts:
        if prompt.key != first.key:
            raise ShapeError(
                f"cannot batch invoke {first.index}, which passes {first.key}, with invoke "
                f"{prompt.index}, which passes {prompt.key}: every invoke of a trace passes "
                "token ids, or every one embeddings",
                invokes=(first.index, prompt.index),
            )
        if any(isinstance(arg, torch.Tensor) for arg in prompt.args):
            raise ShapeError(
                f"invoke {prompt.index} passes a tensor positionally that is not a parameter of "
                "the traced method; prompts of different lengths are left-padded, which is done "
                "for the inputs it names: pass it by keyword, e.g. "
                "tr.invoke(input_ids, attention_mask=mask)",
                invokes=(prompt.index,),
            )


def pad(
    prompt: Prompt, length: int, pad_token_id: int, positions: str | None, labels: bool
) -> Inputs:
    """`prompt` left-padded to `length`: pad tokens (zero embeddings) masked out, labels that
    are ignored (all of them where `labels` is asked for and the prompt has none), and, unless
    `positions` is None, the position ids the prompt has alone (`"columns"`: counted from its
    first column; `"mask"`: counted over its real tokens)."""
    tokens, per_token = prompt.tokens, prompt.per_token
    rows, missing = tokens.shape[0], length - prompt.length
    mask = per_token.get("attention_mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    padded = {**per_token, "attention_mask": mask}
    if labels and "labels" not in padded:
        padded["labels"] = torch.full_like(mask, IGNORE_INDEX, dtype=torch.long)
    if positions is not None and "position_ids" not in padded:
        padded["position_ids"] = solo_positions(mask, positions)
    if missing:
        if prompt.key == "input_ids":
            tokens = _left(tokens, tokens.new_full((rows, missing), pad_token_id))
        else:
            tokens = _left(tokens, tokens.new_zeros((rows, missing, tokens.shape[2])))
        for name, value in padded.items():
            padded[name] = _left(value, value.new_full((rows, missing), _pad_value(name)))
        if "labels" in padded:  # a prompt's first token is never a target when it runs alone
            padded["labels"][:, missing] = IGNORE_INDEX
    return prompt.args, {**prompt.kwargs, prompt.key: tokens, **padded}


def solo_positions(mask: torch.Tensor, positions: str) -> torch.Tensor:
    """The position ids each row of `mask` has alone: `"columns"` counts its columns from the
    first, `"mask"` its real tokens (0 for the padding before them)."""
    if positions == "columns":
        return torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _pad_value(name: str) -> int:
    return IGNORE_INDEX if name == "labels" else 0


def _left(value: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    return torch.cat([padding, value], dim=1)
