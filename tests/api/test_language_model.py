"""`LanguageModel`: loading by path, weights loaded late, text and token inputs, `scan`.

Models: a config-built tiny Llama and GPT-2, saved with a word-level tokenizer built here to a
temporary directory (nothing is downloaded). Oracles: the same directory loaded by
`AutoModelForCausalLM.from_pretrained` and run one prompt at a time, unpadded (its logits, a
forward hook's output, greedy `generate`); for `scan`, the shapes and dtypes a real trace gives.
"""

# ruff: noqa: F841

from __future__ import annotations

import functools

import pytest
import torch
from conftest import WORDS, assert_untouched, tiny_gpt2, tiny_llama, word_tokenizer
from torch import nn

import mediator

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

PROMPTS = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved(request, tmp_path_factory) -> tuple[str, str]:
    """(architecture, directory) of a tiny causal LM saved with its tokenizer."""
    kind = request.param
    net = tiny_llama(51) if kind == "llama" else tiny_gpt2(52, n_positions=64)
    path = tmp_path_factory.mktemp(kind)
    net.save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return kind, str(path)


@pytest.fixture(scope="module")
def oracle(saved) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(saved[1])


def ids_of(prompt: str) -> list[int]:
    return [WORDS.index(word) for word in prompt.split()]


_SOLO: dict[tuple[int, str], torch.Tensor] = {}  # (id(oracle), prompt) -> its solo logits


def solo_logits(oracle: nn.Module, prompt: str) -> torch.Tensor:
    """`[T, vocab]`: the prompt run alone, unpadded (once per oracle and prompt)."""
    key = (id(oracle), prompt)
    if key not in _SOLO:
        with torch.no_grad():
            _SOLO[key] = oracle(torch.tensor([ids_of(prompt)])).logits[0]
    return _SOLO[key]


def assert_rows_solo(logits: torch.Tensor, oracle: nn.Module, prompts: list[str]) -> None:
    """Row i of left-padded `logits` ends with the solo logits of `prompts[i]`."""
    assert logits.shape[0] == len(prompts)
    for row, prompt in zip(logits, prompts, strict=True):
        solo = solo_logits(oracle, prompt)
        torch.testing.assert_close(row[-len(solo) :], solo)


def layers(owner: object, kind: str) -> object:
    return functools.reduce(getattr, LAYERS[kind].split("."), owner)


def test_only_the_config_is_read_until_the_first_trace(saved, oracle, loads):
    kind, path = saved
    lm = mediator.LanguageModel(path)
    assert not lm.dispatched and loads == []
    assert {p.device.type for p in lm._module.parameters()} == {"meta"}
    assert type(layers(oracle, kind)[0]).__name__ in repr(lm)  # printed before loading
    with torch.no_grad(), lm.trace(PROMPTS[0]):
        logits = lm.output.logits
    assert lm.dispatched and loads == [path]
    assert {p.device.type for p in lm._module.parameters()} == {"cpu"}
    with torch.no_grad(), lm.trace(PROMPTS[1]):
        again = lm.output.logits
    lm.dispatch()
    assert loads == [path]  # loaded once
    assert_rows_solo(logits, oracle, PROMPTS[:1])
    assert_rows_solo(again, oracle, PROMPTS[1:2])
    assert_untouched(lm._module)


def test_envoys_taken_before_loading_address_the_loaded_modules(saved, oracle):
    kind, path = saved
    lm = mediator.LanguageModel(path)
    layer = layers(lm, kind)[1]  # an Envoy of the meta module
    assert layer.path == f"{LAYERS[kind]}.1"
    seen = []
    handle = layers(oracle, kind)[1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            oracle(torch.tensor([ids_of(PROMPTS[0])]))
    finally:
        handle.remove()
    with torch.no_grad(), lm.trace(PROMPTS[0]):
        hidden = layer.output
    torch.testing.assert_close(hidden, seen[0])
    loaded = dict(layer.named_parameters())  # the Envoy's module is the loaded one
    torch.testing.assert_close(loaded, dict(layers(oracle, kind)[1].named_parameters()))


def test_standard_names_taken_before_loading_address_the_loaded_modules(saved, oracle):
    kind, path = saved
    lm = mediator.LanguageModel(path)
    block, attention = lm.layers[1], lm.layers[0].self_attn  # aliases, before loading
    assert block.path == "layers.1" and len(lm.layers) == len(layers(oracle, kind))
    seen: dict[str, object] = {}

    def keep(name: str):
        return lambda module, args, out: seen.update({name: out})

    real = layers(oracle, kind)
    handles = [
        real[1].register_forward_hook(keep("block")),
        real[0]
        .get_submodule("self_attn" if kind == "llama" else "attn")
        .register_forward_hook(keep("attention")),
    ]
    try:
        with torch.no_grad():
            oracle(torch.tensor([ids_of(PROMPTS[0])]))
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), lm.trace(PROMPTS[0]):
        attended = attention.output[0]
        hidden = block.output
        by_real_path = layers(lm, kind)[1].output
    torch.testing.assert_close(hidden, seen["block"])
    torch.testing.assert_close(attended, seen["attention"][0])
    torch.testing.assert_close(by_real_path, hidden)


def test_from_pretrained_options_pass_through(saved):
    kind, path = saved
    lm = mediator.LanguageModel(path, dtype=torch.float64)
    assert {p.dtype for p in lm._module.parameters()} == {torch.float64}  # the tree, unloaded
    oracle = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    with torch.no_grad(), lm.trace(PROMPTS[:2]):
        logits = lm.output.logits
    assert logits.dtype == torch.float64
    assert_rows_solo(logits, oracle, PROMPTS[:2])


def _input(form: str, tokenizer) -> tuple[object, list[str]]:
    """An input of `form` and the prompts of its rows."""
    if form == "text":
        return PROMPTS[0], PROMPTS[:1]
    if form == "texts":
        return PROMPTS, PROMPTS
    if form == "ids":
        return ids_of(PROMPTS[0]), PROMPTS[:1]
    if form == "rows":
        return [ids_of(prompt) for prompt in PROMPTS], PROMPTS
    if form == "tensor":
        return torch.tensor([ids_of(PROMPTS[2])]), PROMPTS[2:]
    if form == "encoding":  # padded by the tokenizer, on the left
        return tokenizer(PROMPTS, padding=True, return_tensors="pt"), PROMPTS
    assert form == "dict"
    return {"input_ids": [ids_of(prompt) for prompt in PROMPTS[1:]]}, PROMPTS[1:]


FORMS = ["text", "texts", "ids", "rows", "tensor", "encoding", "dict"]


def test_each_input_form_gives_each_row_its_solo_logits(saved, oracle):
    lm = mediator.LanguageModel(saved[1])
    inputs = {form: _input(form, lm.tokenizer) for form in FORMS}
    with torch.no_grad(), lm.trace() as tr:  # one invoke per form, all lengths differ
        logits = {}
        for form in FORMS:
            with tr.invoke(inputs[form][0]):
                logits[form] = lm.output.logits
    for form in FORMS:
        assert_rows_solo(logits[form], oracle, inputs[form][1])


def test_rows_padded_within_one_invoke_give_their_solo_logits(saved, oracle):
    lm = mediator.LanguageModel(saved[1])
    for form in ("texts", "encoding"):
        value, prompts = _input(form, lm.tokenizer)
        with torch.no_grad(), lm.trace(value):  # the only invoke: no padding across invokes
            logits = lm.output.logits
        assert_rows_solo(logits, oracle, prompts)


def test_invokes_of_different_lengths_give_their_solo_logits(saved, oracle):
    kind, path = saved
    lm = mediator.LanguageModel(path)
    with torch.no_grad(), lm.trace() as tr:
        with tr.invoke(PROMPTS[1]):
            short = lm.output.logits
        with tr.invoke([PROMPTS[0], PROMPTS[2]]):
            pair = lm.output.logits
        with tr.invoke(ids_of(PROMPTS[2])):
            ids = lm.output.logits
    assert_rows_solo(short, oracle, PROMPTS[1:2])
    assert_rows_solo(pair, oracle, [PROMPTS[0], PROMPTS[2]])
    assert_rows_solo(ids, oracle, PROMPTS[2:])


def test_generate_from_text_gives_each_prompt_its_solo_generation(saved, oracle):
    lm = mediator.LanguageModel(saved[1])
    new = 5
    with torch.no_grad(), lm.generate(max_new_tokens=new, do_sample=False) as tr:
        with tr.invoke(PROMPTS[0]):
            first = tr.result
        with tr.invoke(PROMPTS[1:]):
            others = tr.result
    assert tr.result.shape == (3, len(ids_of(PROMPTS[0])) + new)
    for tokens, prompt in zip([*first, *others], PROMPTS, strict=True):
        with torch.no_grad():
            solo = oracle.generate(
                torch.tensor([ids_of(prompt)]), max_new_tokens=new, do_sample=False
            )
        torch.testing.assert_close(tokens[-new:], solo[0, -new:])


def test_scan_gives_the_shapes_of_a_trace_without_loading(saved, loads):
    kind, path = saved
    lm = mediator.LanguageModel(path, dtype=torch.float64)
    layer = layers(lm, kind)[0]

    def shapes(tracer):
        with tracer as tr:
            with tr.invoke(PROMPTS[0]):
                a = (layer.output.shape, lm.output.logits.shape, lm.output.logits.dtype)
            with tr.invoke(PROMPTS[1:]):
                b = (layer.output.shape, lm.output.logits.shape, lm.output.logits.dtype)
        return a, b

    scanned = shapes(lm.scan())
    assert not lm.dispatched and loads == []
    assert {p.device.type for p in lm._module.parameters()} == {"meta"}
    with torch.no_grad():
        traced = shapes(lm.trace())
    assert scanned == traced
    assert scanned[0][1] == (1, 5, 100) and scanned[0][2] == torch.float64


def test_a_body_error_in_scan_raises_as_in_a_trace(saved):
    kind, path = saved
    lm = mediator.LanguageModel(path)
    with pytest.raises(ValueError, match="vocabulary of 100"):
        with lm.scan(PROMPTS[0]):
            logits = lm.output.logits
            if logits.shape[-1] != 7:
                raise ValueError(f"vocabulary of {logits.shape[-1]}")
    with pytest.raises(IndexError):
        with lm.scan(PROMPTS[1]):
            last = layers(lm, kind)[0].output[:, 3]  # one token: there is no position 3
    assert not lm.dispatched


def test_a_module_passed_in_is_used_as_it_is(saved, oracle, loads):
    lm = mediator.LanguageModel(oracle, tokenizer=word_tokenizer())
    assert lm.dispatched and lm.tokenizer.pad_token == "<eos>"
    with torch.no_grad(), lm.trace(PROMPTS[1:]):
        logits = lm.output.logits
    with lm.scan(PROMPTS[0]):
        shape = lm.output.logits.shape
    assert loads == [] and shape == (1, 5, 100)
    assert_rows_solo(logits, oracle, PROMPTS[1:])
    with pytest.raises(TypeError, match="a module is used as it is"):
        mediator.LanguageModel(oracle, dtype=torch.float64)


def test_an_unknown_input_raises_naming_the_accepted_forms(saved):
    lm = mediator.LanguageModel(saved[1])
    accepted = "a language model's input is a string, a list of strings"
    for value, given in [(3.5, "float"), ([], "list"), ([1.5, 2.5], "list"), (["w1", 3], "list")]:
        with pytest.raises(TypeError, match=f"{accepted}.*; got {given}"):
            with lm.trace(value):
                pass
    with pytest.raises(TypeError, match=f"{accepted}.*; got object"):
        with lm.trace() as tr:
            with tr.invoke(object()):
                pass


def test_text_without_a_tokenizer_raises_and_ids_still_work(tmp_path, oracle):
    oracle.save_pretrained(tmp_path)  # no tokenizer saved
    lm = mediator.LanguageModel(tmp_path)
    assert lm.tokenizer is None
    with pytest.raises(mediator.UsageError, match="(?s)has no tokenizer .*pass one"):
        with lm.trace(PROMPTS[0]):
            pass
    with torch.no_grad(), lm.trace(ids_of(PROMPTS[0])):
        logits = lm.output.logits
    assert_rows_solo(logits, oracle, PROMPTS[:1])


def test_a_path_without_a_config_or_a_module_that_is_no_lm_raise(tmp_path):
    with pytest.raises(OSError, match="(?s)found no model config there.*save_pretrained"):
        mediator.LanguageModel(tmp_path)
    with pytest.raises(TypeError, match="wraps a causal language model.*mediator.Model"):
        mediator.LanguageModel(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="takes a hub id, a path or a torch.nn.Module"):
        mediator.LanguageModel(3)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_text_inputs_go_to_the_device_of_the_embeddings(saved, oracle):
    kind, path = saved
    lm = mediator.LanguageModel(path, device_map={"": 0})
    with torch.no_grad(), lm.trace() as tr:
        with tr.invoke(PROMPTS[0]):
            first = lm.output.logits
        with tr.invoke([PROMPTS[1], PROMPTS[2]]):
            both = lm.output.logits
    assert first.device.type == "cuda" and both.device.type == "cuda"
    rows = [*first.cpu(), *both.cpu()]
    for row, prompt in zip(rows, PROMPTS, strict=True):  # GPU kernels: a looser tolerance
        solo = solo_logits(oracle, prompt)
        torch.testing.assert_close(row[-len(solo) :], solo, atol=1e-4, rtol=1e-4)
