"""Standard module names of language models (`layers`, `embed_tokens`, `norm`, `lm_head`, ...).

`standard_renames(module)` gives the renames (real path -> standard name) that `LanguageModel`
applies to a supported architecture. This module owns no state. For now it knows no
architecture and returns no renames, so a `LanguageModel` has its real paths only.
"""

from __future__ import annotations

from torch import nn


def standard_renames(module: nn.Module) -> dict[str, str]:
    """The renames that give `module` the standard names of its architecture (none yet).

    Example:

        standard_renames(net)               # {} (e.g. {"model.layers": "layers"} once known)
    """
    return {}
