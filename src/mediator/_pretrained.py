"""Hugging Face loading for `LanguageModel`: config, module tree (no weights), weights, tokenizer.

A name or path is read in three steps: `load_config` reads its config (no weights);
`build_tree` builds the module tree from it under a context that gives it no memory
(`torch.device("meta")`, or a `FakeTensorMode` for a shape-only run); `load_weights` calls
`AutoModelForCausalLM.from_pretrained` with the user's options. Each step gets only the options
it understands: hub and file options (`revision`, `gguf_file`, ...) go to all three, build
options (`dtype`, `attn_implementation`) to the tree too, and every option to `from_pretrained`.
`transformers` is imported inside the functions, so `import mediator` does not import it. This
module owns no state.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

#: Options of `from_pretrained` that say where and how to find the files.
_HUB_OPTIONS = frozenset(
    {
        "cache_dir",
        "code_revision",
        "force_download",
        "gguf_file",
        "local_files_only",
        "proxies",
        "revision",
        "subfolder",
        "token",
        "trust_remote_code",
    }
)
#: Options of `from_pretrained` that shape the module tree itself.
_BUILD_OPTIONS = frozenset({"attn_implementation", "dtype", "trust_remote_code"})


def hub_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options among `options` that say where the files are (for config and tokenizer)."""
    return {name: value for name, value in options.items() if name in _HUB_OPTIONS}


def load_config(path: str, options: dict[str, Any]) -> Any:
    """The model config at `path` (a directory or a hub id); raises OSError saying what to pass
    instead where there is none."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **hub_options(options))
    except (OSError, ValueError) as error:
        raise OSError(
            f"mediator.LanguageModel({path!r}) found no model config there: {error}\n"
            "Pass a hub id or a directory holding a config.json (net.save_pretrained(directory) "
            "writes one), or a module already loaded: mediator.LanguageModel(net, tokenizer=...)"
        ) from error


def build_tree(config: Any, options: dict[str, Any], context: AbstractContextManager[Any]) -> Any:
    """The causal LM that `config` describes, built under `context` (which decides where its
    parameters live: the meta device, fake tensors) and put in eval mode, as `from_pretrained`
    gives it."""
    from transformers import AutoModelForCausalLM

    build = {name: value for name, value in options.items() if name in _BUILD_OPTIONS}
    if build.get("dtype") == "auto":  # the config's own dtype: what from_config uses anyway
        del build["dtype"]
    with context:
        return AutoModelForCausalLM.from_config(config, **build).eval()  # type: ignore[no-untyped-call]


def load_weights(path: str, options: dict[str, Any]) -> nn.Module:
    """The causal LM at `path` with its weights, loaded with the user's options."""
    from transformers import AutoModelForCausalLM

    module: nn.Module = AutoModelForCausalLM.from_pretrained(path, **options)
    return module


def input_device(module: nn.Module) -> torch.device | None:
    """Where `module`'s token embeddings are, which is where tokenized inputs go; None where
    that is not known (no embeddings, or weights not loaded or offloaded: accelerate's hooks
    then move the inputs)."""
    embeddings = getattr(module, "get_input_embeddings", None)
    weight = getattr(embeddings() if callable(embeddings) else None, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
        return weight.device
    return None


def load_tokenizer(path: str, options: dict[str, Any]) -> tuple[Any, str | None]:
    """The tokenizer saved at `path`, ready for batches of prompts (a pad token, else its end
    of sequence token; left padding), and None; or None and why it could not be loaded."""
    from transformers import AutoTokenizer

    if not path:
        return None, "the module names no directory or hub id to load one from"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_options(options))
    except (OSError, ValueError, TypeError) as error:
        return None, f"loading it from {path!r} failed: {error}"
    if getattr(tokenizer, "vocab_size", None) == 0:  # made up from the config alone
        return None, f"{path!r} holds no tokenizer files"
    prepare_tokenizer(tokenizer)
    tokenizer.padding_side = "left"
    return tokenizer, None


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give `tokenizer` a pad token if it has none: its end-of-sequence token."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
