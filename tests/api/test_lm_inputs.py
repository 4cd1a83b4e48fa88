"""Causal-LM inputs batch invisibly: user padding, `inputs_embeds`, positional masks, errors.

Oracles: a plain forward (or `generate`) of the module with the invoke's own inputs, which is
also what the invoke computes traced alone. Models: config-built GPT-2 and Llama (nothing is
downloaded) and `mediator.models.TinyLM` (which numbers positions over its mask).
"""

# ruff: noqa: F841

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch
from conftest import MLP, assert_untouched, tiny_gpt2, tiny_llama
from torch import nn

import mediator
from mediator.models import TinyLM, TinyLMConfig

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
HERE = re.escape(__file__.rsplit("/", 1)[-1])


def _gpt2() -> nn.Module:
    return tiny_gpt2(41, n_positions=64)


def _llama() -> nn.Module:
    return tiny_llama(42, pad_token_id=0)


def _tiny() -> nn.Module:
    torch.manual_seed(43)
    return TinyLM(TinyLMConfig(vocab_size=100)).eval()


@pytest.fixture(params=["gpt2", "llama", "tiny"])
def lm(request):
    net = {"gpt2": _gpt2, "llama": _llama, "tiny": _tiny}[request.param]()
    yield net
    assert_untouched(net)


@pytest.fixture
def padded():
    """Two prompts of one invoke, padded by the user: ids, left-padding mask, right-padding mask."""
    torch.manual_seed(44)
    ids = torch.randint(1, 100, (2, 6))
    left = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    return ids, left, right


def logits_of(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


@pytest.mark.parametrize("side", ["left", "right"])
def test_user_padding_gives_solo_logits_next_to_a_longer_invoke(lm, padded, side):
    ids, left, right = padded
    mask = left if side == "left" else right
    longer = torch.randint(1, 100, (1, 9))
    model = mediator.Model(lm)
    with torch.no_grad():
        solo = logits_of(lm(ids, attention_mask=mask))
        with model.trace(ids, attention_mask=mask):
            alone = logits_of(model.output)
        with model.trace() as tr:
            with tr.invoke(longer):
                other = logits_of(model.output)
            with tr.invoke(ids, attention_mask=mask):
                batched = logits_of(model.output)
    real = mask.bool()
    torch.testing.assert_close(alone, solo)
    extra = longer.shape[1] - ids.shape[1]
    torch.testing.assert_close(batched[:, extra:][real], solo[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(other, logits_of(lm(longer)).detach(), atol=1e-5, rtol=0)


def test_inputs_embeds_alone_and_batched(lm):
    if isinstance(lm, TinyLM):
        pytest.skip("TinyLM takes token ids only")
    torch.manual_seed(45)
    short, long = torch.randn(2, 3, 32), torch.randn(1, 5, 32)
    model = mediator.Model(lm)
    with torch.no_grad():
        solo_short = lm(inputs_embeds=short).logits
        solo_long = lm(inputs_embeds=long).logits
        with model.trace(inputs_embeds=short):
            alone = model.output.logits
        with model.trace() as tr:
            with tr.invoke(inputs_embeds=short):
                got_short = model.output.logits
            with tr.invoke(inputs_embeds=long):
                got_long = model.output.logits
    torch.testing.assert_close(alone, solo_short)
    torch.testing.assert_close(got_short[:, 2:], solo_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_long, solo_long, atol=1e-5, rtol=0)


def test_ids_in_one_invoke_and_embeds_in_another_is_shape_error(lm):
    model = mediator.Model(lm)
    with pytest.raises(mediator.ShapeError) as caught:
        with model.trace() as tr:
            with tr.invoke(torch.randint(1, 100, (1, 4))):
                pass
            with tr.invoke(inputs_embeds=torch.randn(1, 3, 32)):
                pass
    message = str(caught.value)
    assert "invoke 0, which passes input_ids, with invoke 1, which passes inputs_embeds" in message
    assert re.search(rf"invoke 0: .*{HERE}:\d+\n  invoke 1: .*{HERE}:\d+", message)


@pytest.mark.parametrize("kind", ["llama", "tiny"])
def test_positional_mask_is_named_by_the_forward_signature(kind, padded):
    """Llama's and TinyLM's forwards take (input_ids, attention_mask, ...)."""
    net = _llama() if kind == "llama" else _tiny()
    ids, left, _ = padded
    longer = torch.randint(1, 100, (1, 8))
    model = mediator.Model(net)
    with torch.no_grad():
        solo = logits_of(net(ids, left))
        with model.trace() as tr:
            with tr.invoke(ids, left):
                positional = logits_of(model.output)
            with tr.invoke(longer):
                pass
        with model.trace() as tr:
            with tr.invoke(ids, attention_mask=left):
                keyword = logits_of(model.output)
            with tr.invoke(longer):
                pass
    torch.testing.assert_close(positional, keyword)
    torch.testing.assert_close(positional[:, 2:][left.bool()], solo[left.bool()], atol=1e-5, rtol=0)


def test_token_ids_of_another_dtype_is_shape_error_naming_invoke_and_input(lm):
    model = mediator.Model(lm)
    with pytest.raises(mediator.ShapeError) as caught:
        with model.trace() as tr:
            with tr.invoke(torch.randint(1, 100, (1, 4))):
                pass
            tr.invoke(torch.rand(1, 4)).run(lambda: None)
    message = str(caught.value)
    assert "cannot batch input 'input_ids'" in message and "invoke 1 passes" in message
    assert re.search(rf"invoke 1: .*{HERE}:\d+", message)


def test_embeddings_passed_as_ids_is_shape_error(lm):
    model = mediator.Model(lm)
    with pytest.raises(mediator.ShapeError, match=r"invoke 1: input_ids is .*inputs_embeds="):
        with model.trace() as tr:
            with tr.invoke(torch.randint(1, 100, (1, 4))):
                pass
            with tr.invoke(torch.randn(1, 4, 32)):
                pass


def test_base_batcher_errors_name_invoke_input_and_line():
    model = mediator.Model(MLP())
    cases = [
        ((torch.randn(1, 8),), (torch.randn(1, 5),), r"input 0: invoke 0 passes .* invoke 1 "),
        ((torch.randn(1, 8),), (torch.randint(0, 9, (1, 8)),), r"input 0: invoke 0 .*int64"),
    ]
    for first, second, pattern in cases:
        with pytest.raises(mediator.ShapeError, match=pattern) as caught:
            with model.trace() as tr:
                tr.invoke(*first).run(lambda: None)
                tr.invoke(*second).run(lambda: None)
        assert re.search(rf"invoke 0: .*{HERE}:\d+\n  invoke 1: .*{HERE}:\d+", str(caught.value))


class Scaled(nn.Module):
    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return x * scale


def test_base_batcher_different_non_tensor_inputs_is_shape_error():
    model = mediator.Model(Scaled())
    with pytest.raises(mediator.ShapeError, match=r"input 1: invoke 0 passes 2.0 and invoke 1 "):
        with model.trace() as tr:
            tr.invoke(torch.ones(1, 2), 2.0).run(lambda: None)
            tr.invoke(torch.ones(1, 2), 3.0).run(lambda: None)


GREEDY = {"max_new_tokens": 3, "do_sample": False}


def test_generation_with_user_left_padding_equals_solo(padded):
    net = _llama()
    ids, left, _ = padded
    other = torch.randint(1, 100, (1, 9))
    model = mediator.Model(net)
    solo = net.generate(ids, attention_mask=left, **GREEDY)
    solo_other = net.generate(other, **GREEDY)
    with model.generate(**GREEDY) as tr:
        mine = tr.invoke(ids, attention_mask=left).run(lambda: tr.result)
        theirs = tr.invoke(other).run(lambda: tr.result)
    new = GREEDY["max_new_tokens"]
    assert torch.equal(mine.result()[:, -new:], solo[:, -new:])
    assert torch.equal(theirs.result(), solo_other)


def test_generation_from_inputs_embeds_equals_solo():
    net = _llama()
    torch.manual_seed(46)
    short, long = torch.randn(1, 3, 32), torch.randn(2, 5, 32)
    model = mediator.Model(net)
    solo_short = net.generate(inputs_embeds=short, **GREEDY)
    solo_long = net.generate(inputs_embeds=long, **GREEDY)
    with model.generate(**GREEDY) as tr:
        got_short = tr.invoke(inputs_embeds=short).run(lambda: tr.result)
        got_long = tr.invoke(inputs_embeds=long).run(lambda: tr.result)
    assert torch.equal(got_short.result(), solo_short)
    assert torch.equal(got_long.result(), solo_long)


@pytest.mark.parametrize("shared", [True, False], ids=["one-cache", "two-caches"])
def test_caches_passed_by_several_invokes_are_a_shape_error(shared):
    """A cache is the model's state for its own rows: alone an invoke may continue from one
    (equal to plain HF), next to another invoke it is refused, naming the input."""
    net = _gpt2()
    model = mediator.Model(net)
    key = "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"
    prompt, nxt = torch.randint(1, 100, (1, 5)), torch.randint(1, 100, (1, 1))
    with torch.no_grad():
        first = net(prompt, use_cache=True).past_key_values
        expected = net(nxt, **{key: copy.deepcopy(first)}).logits
        with model.trace(nxt, **{key: copy.deepcopy(first)}):
            alone = model.output.logits
        torch.testing.assert_close(alone, expected)
        second = first if shared else net(prompt, use_cache=True).past_key_values
        with pytest.raises(mediator.ShapeError, match=rf"'{key}'.*cannot be shared"):
            with model.trace() as tr:
                with tr.invoke(nxt, **{key: first}):
                    pass
                with tr.invoke(nxt, **{key: second}):
                    pass
