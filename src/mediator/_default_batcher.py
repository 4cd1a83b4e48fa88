"""Which Batcher a wrapped module gets when the user names none.

A Hugging Face style language model (a `config` and a `generate` method, not an
encoder-decoder) gets a `CausalLMBatcher` set up from its config: its pad token, whether its
forward takes `position_ids`, how it numbers positions without them, and its own loss; any
other module gets the plain `Batcher`. This module owns no state.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from ._batcher import Batcher
from ._causal_lm import CausalLMBatcher
from ._lm_loss import LossFunction


def default_batcher(module: nn.Module) -> Batcher:
    """A causal-LM batcher (left padding) for language models that generate, else the plain one."""
    config = getattr(module, "config", None)
    if config is None or not callable(getattr(module, "generate", None)):
        return Batcher()
    if getattr(config, "is_encoder_decoder", False):
        return Batcher()
    try:
        takes_positions = "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    return CausalLMBatcher(
        _pad_token(config), takes_positions, _positions_of(module, config), _loss_of(module, config)
    )


# Hugging Face model types whose forward numbers positions over the attention mask's real
# tokens when given no `position_ids`; the others (transformers 5) number them by column.
_MASK_POSITIONS = frozenset({"opt"})


def _positions_of(module: nn.Module, config: Any) -> str:
    """How `module` numbers positions by default (see `CausalLMBatcher`)."""
    from_transformers = type(module).__module__.startswith("transformers.")
    if from_transformers and getattr(config, "model_type", None) not in _MASK_POSITIONS:
        return "columns"
    return "mask"


def _loss_of(module: nn.Module, config: Any) -> LossFunction | None:
    """The model's own loss of `(logits, labels)` (Hugging Face `loss_function`), if it has one."""
    loss = getattr(module, "loss_function", None)
    vocab = getattr(config, "vocab_size", None)
    if not callable(loss) or not isinstance(vocab, int):
        return None
    return functools.partial(loss, vocab_size=vocab)


def _pad_token(config: Any) -> int:
    """The config's pad token, else its end-of-sequence token, else 0."""
    vocab = getattr(config, "vocab_size", None)
    for name in ("pad_token_id", "eos_token_id"):
        token = getattr(config, name, None)
        if isinstance(token, (list, tuple)):
            token = token[0] if token else None
        if isinstance(token, int) and (vocab is None or 0 <= token < vocab):
            return token
    return 0
