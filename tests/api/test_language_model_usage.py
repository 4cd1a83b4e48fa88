"""`LanguageModel` as a new user drives it: edits made before the weights load, plain calls
with text, prompts a tokenizer padded on the right given to `generate`.

Models: a config-built tiny Llama saved with a word-level tokenizer built here to a temporary
directory (nothing is downloaded). Oracles: the same directory loaded by
`AutoModelForCausalLM.from_pretrained` and run one prompt at a time, unpadded (with a forward
hook where the trace writes), and its greedy `generate`.
"""

# ruff: noqa: F841

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import WORDS, tiny_llama, word_tokenizer
from torch import nn

import mediator

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

PROMPTS = ["w1 w2 w3 w4 w5", "w6", "w7 w8 w9"]


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    """A directory holding a tiny Llama and its tokenizer."""
    directory = tmp_path_factory.mktemp("llama")
    tiny_llama(61).save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def oracle(path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def ids_of(prompt: str) -> torch.Tensor:
    return torch.tensor([[WORDS.index(word) for word in prompt.split()]])


def zeroed_mlp_logits(oracle: nn.Module, prompt: str) -> torch.Tensor:
    """The logits of `prompt` alone with the MLP of layer 0 zeroed by a forward hook."""
    handle = oracle.model.layers[0].mlp.register_forward_hook(
        lambda module, args, out: torch.zeros_like(out)
    )
    try:
        with torch.no_grad():
            return oracle(ids_of(prompt)).logits
    finally:
        handle.remove()


def test_an_edit_made_before_loading_applies_to_the_weights_loaded_once(path, oracle, loads):
    lm = mediator.LanguageModel(path)

    def silence() -> None:
        lm.layers[0].mlp.output[:] = 0

    edited = lm.edit().run(silence)
    assert not lm.dispatched and not edited.dispatched
    with torch.no_grad(), edited.trace(PROMPTS[0]):
        logits = edited.output.logits
    assert lm.dispatched and edited.dispatched and loads == [path]
    torch.testing.assert_close(logits, zeroed_mlp_logits(oracle, PROMPTS[0]))
    with torch.no_grad(), lm.trace(PROMPTS[0]):  # the model itself stays unedited
        hidden = lm.layers[0].mlp.output
        plain = lm.output.logits
    assert loads == [path] and lm._module is edited._module
    torch.testing.assert_close(plain, oracle(ids_of(PROMPTS[0])).logits)
    assert hidden.abs().sum() > 0
    with torch.no_grad():
        called = edited(ids_of(PROMPTS[0])).logits
    torch.testing.assert_close(called, zeroed_mlp_logits(oracle, PROMPTS[0]))


def test_a_plain_call_takes_text_and_gives_each_row_its_solo_logits(path, oracle):
    lm = mediator.LanguageModel(path)
    with torch.no_grad():
        one = lm(PROMPTS[0]).logits
        rows = lm(PROMPTS).logits  # left-padded to the longest
        ids = lm(ids_of(PROMPTS[1])).logits  # tensors as before
        solo = [oracle(ids_of(prompt)).logits[0] for prompt in PROMPTS]
    torch.testing.assert_close(one[0], solo[0])
    torch.testing.assert_close(ids[0], solo[1])
    for row, alone in zip(rows, solo, strict=True):
        torch.testing.assert_close(row[-len(alone) :], alone)
    edited = lm.edit().run(lambda: None)  # an edited model's call goes through a trace
    with torch.no_grad():
        torch.testing.assert_close(edited(PROMPTS[1]).logits[0], solo[1])


def test_generate_from_prompts_padded_on_the_right_gives_their_solo_generations(path, oracle):
    lm = mediator.LanguageModel(path)
    tokenizer = word_tokenizer()
    tokenizer.pad_token, tokenizer.padding_side = "<pad>", "right"  # as GPT-2's tokenizer pads
    encoding = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert not bool(encoding["attention_mask"][:, -1].all())  # padded on the right
    greedy = {"max_new_tokens": 3, "do_sample": False}
    with torch.no_grad(), lm.generate(encoding, **greedy) as tr:
        pass
    with torch.no_grad(), lm.generate(**greedy) as tr_invokes:
        for row in range(len(PROMPTS)):
            alone = {name: value[row : row + 1] for name, value in encoding.items()}
            with tr_invokes.invoke(alone):
                pass
    for row, prompt in enumerate(PROMPTS):
        solo = oracle.generate(ids_of(prompt), **greedy)[0]
        assert torch.equal(tr.result[row, -len(solo) :], solo)
        assert torch.equal(tr_invokes.result[row, -len(solo) :], solo)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_copying_or_pickling_a_model_says_what_to_do_instead(path, how):
    lm = mediator.LanguageModel(path)
    copier = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": lambda value: pickle.loads(pickle.dumps(value)),
    }[how]
    for value in (lm, lm.layers[0], mediator.Model(nn.Linear(2, 2))):
        with pytest.raises(TypeError, match="cannot be copied or pickled.*instead"):
            copier(value)
