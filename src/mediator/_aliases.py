"""The standard names of Hugging Face causal language models: one table, by `config.model_type`.

`standard_renames(net)` gives the `rename=` dict (see `_renames.py`) that adds `embed_tokens`,
`layers` (so `layers[i]`), `layers[i].self_attn`, `layers[i].mlp`, `norm` (the final norm) and
`lm_head` beside an architecture's own paths. The table is constant; this module owns no state.
"""

from __future__ import annotations

from torch import nn

# Where each standard name lives, by model type: embeddings, layer list and final norm (paths
# from the root), then the attention and MLP inside each layer (child names). `lm_head` is the
# real name of the head in every listed architecture.
_Places = tuple[str, str, str, str, str | None]
_DECODER: _Places = ("model.embed_tokens", "model.layers", "model.norm", "self_attn", "mlp")
_TABLE: dict[str, _Places] = {
    "gpt2": ("transformer.wte", "transformer.h", "transformer.ln_f", "attn", "mlp"),
    "gpt_neox": (
        "gpt_neox.embed_in",
        "gpt_neox.layers",
        "gpt_neox.final_layer_norm",
        "attention",
        "mlp",
    ),
    # OPT's MLP is no module of its own (fc1 and fc2 run on flattened tokens): no `mlp` name
    "opt": (
        "model.decoder.embed_tokens",
        "model.decoder.layers",
        "model.decoder.final_layer_norm",
        "self_attn",
        None,
    ),
    **dict.fromkeys(
        (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma2",
            "gemma3_text",
            "phi3",
            "mixtral",
            "qwen2_moe",
            "qwen3_moe",
        ),
        _DECODER,
    ),
}
_STANDARD = ("embed_tokens", "layers", "norm", "self_attn", "mlp")
_IN_EACH_LAYER = ("self_attn", "mlp")


def standard_renames(module: nn.Module) -> dict[str, str]:
    """The `rename=` dict that gives a Hugging Face causal LM the standard names.

    `embed_tokens`, `layers` (`layers[i]`), `layers[i].self_attn`, `layers[i].mlp` (the
    mixture-of-experts block for Mixtral and Qwen-MoE), `norm` (the final norm) and `lm_head`,
    as aliases beside the real paths, for GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Qwen3, Gemma 2,
    Gemma 3 (text), Phi-3, OPT (no `mlp`: its MLP is not one module), Mixtral, Qwen2-MoE and
    Qwen3-MoE, found by `config.model_type`. Names the model already has, and paths it lacks,
    are left out; another model gets `{}`.

    Example:

        net = transformers.AutoModelForCausalLM.from_pretrained("gpt2")
        standard_renames(net)   # {"transformer.wte": "embed_tokens", "transformer.h": "layers",
                                #  "transformer.ln_f": "norm", "attn": "self_attn"}
        model = mediator.Model(net, rename=standard_renames(net))
        with model.trace(input_ids):
            h = model.layers[3].self_attn.output
    """
    config = getattr(module, "config", None)
    places = _TABLE.get(getattr(config, "model_type", None) or "")
    if places is None:
        return {}
    paths = dict(module.named_modules())
    layers = paths.get(places[1])
    first = next(iter(layers.children()), None) if layers is not None else None
    renames = {}
    for standard, real in zip(_STANDARD, places, strict=True):
        if real is None or real == standard:
            continue
        if standard in _IN_EACH_LAYER:
            present = first is not None and first._modules.get(real) is not None
        else:
            present = paths.get(real) is not None
        if present:
            renames[real] = standard
    return renames
