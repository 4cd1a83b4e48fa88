"""Aliases: `Model(net, rename={...})` and the standard names of Hugging Face causal LMs.

Every value read or written through an alias is compared with a plain forward hook on the real
module; errors and cache keys must use the name the body wrote.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import MLP, WORDS, tiny_gpt2, word_tokenizer
from torch import nn

import mediator
from mediator import Envoy, Model, OutOfOrderError, ShapeError, UsageError, standard_renames

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
_LLAMA_LIKE = ("model.embed_tokens", "model.layers", "self_attn", "mlp", "model.norm")

# model type -> (config, the real paths of embed_tokens, layers, self_attn, mlp, norm): the oracle
ARCHITECTURES: dict[str, tuple[Callable[[], Any], tuple[str, str, str, str | None, str]]] = {
    "gpt2": (
        lambda: transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=4, vocab_size=64, bos_token_id=1, eos_token_id=2
        ),
        ("transformer.wte", "transformer.h", "attn", "mlp", "transformer.ln_f"),
    ),
    "gpt_neox": (
        lambda: transformers.GPTNeoXConfig(**{**_SIZES, "num_key_value_heads": 4}),
        ("gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    ),
    "llama": (lambda: transformers.LlamaConfig(**_SIZES), _LLAMA_LIKE),
    "mistral": (lambda: transformers.MistralConfig(**_SIZES), _LLAMA_LIKE),
    "qwen2": (lambda: transformers.Qwen2Config(**_SIZES), _LLAMA_LIKE),
    "qwen3": (lambda: transformers.Qwen3Config(**_SIZES, head_dim=8), _LLAMA_LIKE),
    "gemma2": (lambda: transformers.Gemma2Config(**_SIZES, head_dim=8), _LLAMA_LIKE),
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(**_SIZES, head_dim=8), _LLAMA_LIKE),
    "phi3": (lambda: transformers.Phi3Config(**_SIZES), _LLAMA_LIKE),
    "opt": (
        lambda: transformers.OPTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            vocab_size=64,
            word_embed_proj_dim=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        (
            "model.decoder.embed_tokens",
            "model.decoder.layers",
            "self_attn",
            None,  # OPT's MLP is no module of its own
            "model.decoder.final_layer_norm",
        ),
    ),
    "mixtral": (
        lambda: transformers.MixtralConfig(**_SIZES, num_local_experts=4, num_experts_per_tok=2),
        _LLAMA_LIKE,
    ),
    "qwen2_moe": (
        lambda: transformers.Qwen2MoeConfig(**_SIZES, **_MOE, shared_expert_intermediate_size=16),
        _LLAMA_LIKE,
    ),
    "qwen3_moe": (lambda: transformers.Qwen3MoeConfig(**_SIZES, **_MOE, head_dim=8), _LLAMA_LIKE),
}


def _built(model_type: str) -> nn.Module:
    """A tiny model of the architecture, its weights drawn from seed 0."""
    config, _ = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config()).eval()


def _at(root: Any, path: str) -> Any:
    """The child of `root` (a module or an Envoy) at `path`, by real names or aliases."""
    return functools.reduce(
        lambda node, part: node[part] if part.isdigit() else getattr(node, part),
        path.split("."),
        root,
    )


def _same(a: Any, b: Any) -> bool:
    """The same structure with equal tensors (and equal other leaves)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _hooked(
    net: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, edit: Any = None
) -> tuple[dict[str, Any], Any]:
    """The outputs of `modules` (name -> module) in a plain forward of `net`, with forward hooks;
    `edit` = (module, function) replaces one module's output by function(output)."""
    seen: dict[str, Any] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, name=name: seen.setdefault(name, out))
        for name, module in modules.items()
    ]
    if edit is not None:
        handles.append(edit[0].register_forward_hook(lambda m, a, out: edit[1](out)))
    try:
        with torch.no_grad():
            logits = net(x).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


def _double(value: Any) -> Any:
    """A module's output with its first tensor doubled (tuples keep their other parts)."""
    if isinstance(value, tuple):
        return (value[0] * 2, *value[1:])
    return value * 2


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_every_standard_name_is_the_real_module(model_type: str) -> None:
    net = _built(model_type)
    embed, layers, attn, mlp, norm = ARCHITECTURES[model_type][1]
    assert net.config.model_type == model_type
    model = Model(net, rename=standard_renames(net))
    # the oracle: hooks on the modules at their real paths, in the order the model runs them
    real = {"embed_tokens": net.get_submodule(embed)}
    if mlp is not None:
        real["layers.0.mlp"] = net.get_submodule(f"{layers}.0.{mlp}")
    real["layers.0"] = net.get_submodule(f"{layers}.0")
    real["layers.1.self_attn"] = net.get_submodule(f"{layers}.1.{attn}")
    if mlp is not None:
        real["layers.1.mlp"] = net.get_submodule(f"{layers}.1.{mlp}")
    real["norm"] = net.get_submodule(norm)
    real["lm_head"] = net.get_submodule("lm_head")
    torch.manual_seed(1)
    x = torch.randint(3, 64, (2, 5))
    expected, logits = _hooked(net, real, x)
    assert len(model.layers) == 2
    assert [layer.path for layer in model.layers] == ["layers.0", "layers.1"]

    with torch.no_grad(), model.trace(x):
        got = {}
        for name in real:
            got[name] = _at(model, name).output
            if name == "layers.1.self_attn":  # the real path, in the same trace
                by_real_path = _at(model, f"{layers}.1.{attn}").output
        traced_logits = model.output.logits
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert _same(got[name], value), name
    assert _same(by_real_path, expected["layers.1.self_attn"])
    assert torch.equal(traced_logits, logits)

    # a write through an alias is the write a hook on the real module makes
    target = "layers.1.mlp" if mlp is not None else "layers.1.self_attn"
    _, edited = _hooked(net, {}, x, edit=(real[target], _double))
    with torch.no_grad(), model.trace(x):
        envoy = _at(model, target)
        envoy.output = _double(envoy.output)
        written = model.output.logits
    assert not torch.equal(edited, logits)
    assert torch.equal(written, edited)


def test_standard_renames_leave_out_what_the_model_has_or_lacks() -> None:
    llama = _built("llama")
    assert standard_renames(llama) == {
        "model.embed_tokens": "embed_tokens",
        "model.layers": "layers",
        "model.norm": "norm",
    }
    assert "mlp" not in standard_renames(_built("opt")).values()
    assert standard_renames(nn.Linear(2, 2)) == {}
    other = MLP()
    other.config = SimpleNamespace(model_type="bert")  # type: ignore[assignment]
    assert standard_renames(other) == {}


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_gpt2(0)


@pytest.fixture
def aliased(gpt2: nn.Module) -> Model:
    return Model(gpt2, rename={"transformer.h": "layers", "attn": "self_attn"})


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(0, 100, (2, 6))


def test_an_alias_is_an_envoy_beside_the_real_one(aliased: Model, gpt2: nn.Module) -> None:
    block = aliased.layers[0]
    assert isinstance(block, Envoy) and block.path == "layers.0"
    assert block.self_attn.path == "layers.0.self_attn"
    assert aliased.transformer.h[0].self_attn.path == "transformer.h.0.self_attn"
    assert aliased.layers[0].attn.path == "layers.0.attn"
    assert aliased["layers"] is aliased.layers and block["self_attn"] is block.self_attn
    assert block.self_attn.c_attn.weight is gpt2.transformer.h[0].attn.c_attn.weight
    assert [b.path for b in aliased.layers] == ["layers.0", "layers.1"]
    assert len(aliased.transformer) == len(list(gpt2.transformer.children()))  # no extra child
    assert "layers" in dir(aliased) and "self_attn" in dir(block)
    text = repr(aliased)
    assert text.startswith(repr(gpt2))
    assert "layers -> transformer.h" in text and "*.self_attn -> *.attn (2 modules)" in text
    assert repr(Model(gpt2)) == repr(gpt2)
    with pytest.raises(
        AttributeError, match=r"model.layers.0 .*'self_atn'.*Did you mean: 'self_attn'"
    ):
        _ = block.self_atn


def test_reads_by_alias_and_real_path_in_several_invokes(
    aliased: Model, gpt2: nn.Module, ids: torch.Tensor
) -> None:
    expected, _ = _hooked(
        gpt2, {"attn": gpt2.transformer.h[1].attn, "block": gpt2.transformer.h[1]}, ids
    )
    with torch.no_grad(), aliased.trace() as tr:
        with tr.invoke(ids[:1]):
            first = aliased.layers[1].self_attn.output[0]
            first_block = aliased.transformer.h[1].output
        with tr.invoke(ids[1:]):
            second = aliased.transformer.h[1].attn.output[0]
            second_block = aliased.layers[1].output
    assert torch.equal(torch.cat([first, second]), expected["attn"][0])
    assert torch.equal(torch.cat([first_block, second_block]), expected["block"])


def test_cache_keys_are_the_names_written(
    aliased: Model, gpt2: nn.Module, ids: torch.Tensor
) -> None:
    h = gpt2.transformer.h
    expected, _ = _hooked(gpt2, {"a": h[0].attn, "b": h[1].mlp, "c": h[1].attn}, ids)
    with torch.no_grad(), aliased.trace(ids) as tr:
        cache = tr.cache(
            modules=[aliased.layers[0].self_attn, "layers.1.mlp", "transformer.h.1.self_attn"]
        )
    assert set(cache) == {"layers.0.self_attn", "layers.1.mlp", "transformer.h.1.self_attn"}
    assert _same(cache["layers.0.self_attn"][0], expected["a"])
    assert torch.equal(cache["layers.1.mlp"][0], expected["b"])
    assert _same(cache["transformer.h.1.self_attn"][0], expected["c"])
    with torch.no_grad(), aliased.trace(ids) as tr:
        everything = tr.cache()  # kept under the real paths, found by aliases too
    assert "transformer.h.0.attn" in everything and "layers.0.self_attn" not in list(everything)
    assert everything["layers.0.self_attn"] is everything["transformer.h.0.attn"]
    assert _same(everything["layers.0.self_attn"][0], expected["a"])
    with pytest.raises(UsageError, match="no module 'layers.7.self_attn'"):
        with aliased.trace(ids) as tr:
            tr.cache(modules=["layers.7.self_attn"])


def test_errors_name_the_module_as_the_body_wrote_it(aliased: Model, ids: torch.Tensor) -> None:
    with pytest.raises(OutOfOrderError) as caught:
        with aliased.trace(ids):
            _ = aliased.layers[1].output
            _ = aliased.layers[0].self_attn.output
    message = str(caught.value)
    assert "layers.0.self_attn.output (call 0)" in message
    assert "it is now at layers.1.output" in message and "transformer.h" not in message

    with pytest.raises(ShapeError, match=r"^layers\.0\.mlp\.output \(call 0\) at .*test_aliases"):
        with aliased.trace(ids):
            aliased.layers[0].mlp.output = torch.zeros(3)

    # another invoke that uses the real path gets the real path in its error
    with pytest.raises(OutOfOrderError, match=r"^transformer\.h\.0\.attn\.output \(call 0\)"):
        with aliased.trace() as tr:
            with tr.invoke(ids[:1]):
                _ = aliased.layers[0].self_attn.output
            with tr.invoke(ids[1:]):
                _ = aliased.transformer.h[1].attn.output
                _ = aliased.transformer.h[0].attn.output


def test_rules_for_any_module() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(MLP(depth=2), MLP(depth=2))
    # "layers" and "1" rename every child so named; "0.layers.1" is a path, given a root alias
    model = Model(net, rename={"layers": "blocks", "0.layers.1": "last_of_first", "1": "second"})
    assert model.second.blocks[0].path == "second.blocks.0"
    assert model[0].blocks.second.path == "0.blocks.second"  # "1" of each ModuleList too
    assert model[0].blocks.path == "0.blocks" and len(model[0].blocks) == 2
    assert len(model) == 2  # aliases are not children: iteration and len() are the real ones
    assert "*.second -> *.1 (3 modules)" in repr(model)
    x = torch.randn(3, 8)
    seen: list[torch.Tensor] = []
    handle = net[0].layers[1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        net(x)
    finally:
        handle.remove()
    with model.trace(x):
        h = model.last_of_first.output
        also = model[0].blocks.second.output
    assert torch.equal(h, seen[0]) and torch.equal(also, seen[0])


BAD_RENAMES: list[tuple[Any, str]] = [
    ({"transformer.hh": "layers"}, r"has no module 'transformer.hh'.*'transformer.h'"),
    ({"atn": "self_attn"}, r"no module .* has a child named 'atn'.*'attn'"),
    ({"attn": "mlp"}, r"model.transformer.h.0 \(GPT2Block\) already has an attribute 'mlp'"),
    ({"transformer.h": "output"}, r"already has an attribute 'output'"),
    ({"transformer.h": "config"}, r"already has an attribute 'config'"),
    ({"transformer.h": "transformer"}, r"already has an attribute 'transformer'"),
    ({"transformer.h": "nowhere.layers"}, r"the alias's parent 'nowhere' is no module"),
    ({"attn": "x.self_attn"}, r"its alias must be one name \(no dots\)"),
    ({"transformer.h": "two words"}, r"a public Python identifier"),
    ({"transformer.h": "_layers"}, r"a public Python identifier"),
    (
        {"transformer.wte": "emb", "transformer.wpe": "emb"},
        r"'transformer.wpe' -> 'emb': the model already has an alias 'emb' for another",
    ),
    ({"transformer.h": ""}, r"non-empty strings"),
    (["transformer.h"], r"takes a dict"),
]


def test_a_bad_rename_is_a_usage_error_at_construction(gpt2: nn.Module) -> None:
    for rename, message in BAD_RENAMES:
        with pytest.raises(UsageError, match=message):
            Model(gpt2, rename=rename)


def test_a_model_without_renames_has_no_aliases(gpt2: nn.Module) -> None:
    model = mediator.Model(gpt2)
    with pytest.raises(AttributeError, match="has no child or attribute 'layers'"):
        _ = model.layers


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_language_model_by_path_traces_text_on_every_architecture(model_type, tmp_path):
    """`LanguageModel(path)` on each listed architecture, with a word tokenizer: two
    prompts of different lengths, one invoke each, read through the standard names; each
    equals its prompt run alone through the model transformers loads from the same folder."""
    _built(model_type).save_pretrained(tmp_path)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = ["w1 w2 w3 w4 w5", "w6 w7"]  # token ids below the tiny vocabulary's 64
    _, layers_path, _, _, _ = ARCHITECTURES[model_type][1]
    # the tokenizer passed: AutoTokenizer builds a Qwen2 one from a qwen2 folder's config
    lm = mediator.LanguageModel(str(tmp_path), tokenizer=word_tokenizer())
    with torch.no_grad(), lm.trace() as tr:
        futures = [
            tr.invoke(prompt).run(lambda: (_first(lm.layers[1].output), lm.output.logits))
            for prompt in prompts
        ]
    reads = [future.result() for future in futures]
    for prompt, (hidden, logits) in zip(prompts, reads, strict=True):
        ids = torch.tensor([[WORDS.index(word) for word in prompt.split()]])
        seen, expected = _hooked(oracle, {"layer": _at(oracle, layers_path)[1]}, ids)
        length = ids.shape[1]
        torch.testing.assert_close(hidden[:, -length:], _first(seen["layer"]))
        torch.testing.assert_close(logits[:, -length:], expected)
