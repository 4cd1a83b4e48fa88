"""How `generate` expands the batch: beam search and several sequences per prompt.

Hugging Face `generate` repeats each prompt's rows before its first forward pass (prompt i's
copies are rows `[i * k, (i + 1) * k)`, `k = max(num_beams, num_return_sequences)`) and returns
`num_return_sequences` sequences per prompt. The factors are known from the call's options (or
the model's `generation_config`), so each invoke's rows scale by them wherever a value has that
many rows per batch row (`_rows.py`). This module owns no state.
"""

from __future__ import annotations

from typing import Any


def generation_expansion(module: Any, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The factors (other than 1) by which `module.generate(**kwargs)` grows the batch: of its
    forward passes and of its return value.

    Example:

        generation_expansion(gpt2, {"num_beams": 3, "num_return_sequences": 2})  # (2, 3)
        generation_expansion(gpt2, {"max_new_tokens": 4})                       # ()
    """
    config = kwargs.get("generation_config") or getattr(module, "generation_config", None)
    beams = _option(kwargs, config, "num_beams")
    returned = _option(kwargs, config, "num_return_sequences")
    return tuple(sorted({max(beams, returned), returned} - {1}))


def _option(kwargs: dict[str, Any], config: Any, name: str) -> int:
    value = kwargs.get(name)
    if value is None:
        value = getattr(config, name, None)
    return value if isinstance(value, int) and value > 1 else 1
