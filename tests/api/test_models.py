"""The built-in models: `TinyLM`'s named attention values and the shipped induction model.

Oracles: attention and logits recomputed by hand from the weights (plain tensor algebra, no
module of the package), plain PyTorch forward hooks, and the numbers documented in
`mediator/models.py`, which these tests measure again.
"""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_untouched

import mediator
from mediator.models import (
    INDUCTION_HEADS,
    INDUCTION_WEIGHTS,
    PREVIOUS_TOKEN_HEAD,
    TinyLM,
    TinyLMConfig,
    induction_prompts,
    load_induction,
    repeated_tokens,
)

TRAIN = ROOT / "examples" / "train_induction.py"
LENGTH = 20  # the documented measurements use sequences [BOS, r_1..r_20, r_1..r_20]

# documented in mediator/models.py: (layer, head) -> score, to two decimals
PREVIOUS_TOKEN_SCORES = {(0, 0): 0.47, (0, 1): 0.57, (0, 2): 0.95, (0, 3): 0.17}
INDUCTION_SCORES = {(1, 0): 0.96, (1, 1): 0.92, (1, 2): 0.81, (1, 3): 0.97}


def by_hand(net: TinyLM, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Attention patterns (per layer, `[batch, head, query, key]`) and logits of an attention-only
    `TinyLM`, recomputed from its weights."""
    width, heads = net.config.width, net.config.heads
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    x = net.embed.weight[ids] + net.position.weight[:length]
    patterns = []
    for block in net.layers:
        normed = F.layer_norm(x, (width,), block.ln1.weight, block.ln1.bias)
        qkv = normed @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.split(width, -1))
        scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        patterns.append(pattern)
        mixed = (pattern @ v).transpose(1, 2).flatten(2)
        x = x + mixed @ block.attn.out.weight.T + block.attn.out.bias
    logits = F.layer_norm(x, (width,), net.ln_f.weight, net.ln_f.bias) @ net.lm_head.weight.T
    return patterns, logits


def scores(pattern: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: mean attention from each token of the first half to the one before it, and from
    each token of the repeat to the token after its earlier occurrence (`length` back, plus 1)."""
    first = torch.arange(1, length + 1)
    repeat = torch.arange(length + 1, 2 * length + 1)
    previous = pattern[:, :, first, first - 1].mean((0, 2))
    induction = pattern[:, :, repeat, repeat - length + 1].mean((0, 2))
    return previous, induction


@pytest.fixture(scope="module")
def induction() -> TinyLM:
    return load_induction()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return repeated_tokens(100, LENGTH, generator=torch.Generator().manual_seed(0))


# -- the shipped file ------------------------------------------------------------------------


def test_weights_are_small_plain_data_loaded_without_unpickling_code(induction):
    assert INDUCTION_WEIGHTS.stat().st_size < 300_000
    saved = torch.load(INDUCTION_WEIGHTS, weights_only=True)
    assert set(saved) == {"config", "state_dict", "training"}
    assert all(isinstance(v, (int, bool, type(None))) for v in saved["config"].values())
    assert saved["config"]["mlp"] is False
    state = induction.state_dict()
    assert state.keys() == saved["state_dict"].keys()
    assert all(torch.equal(state[name], saved["state_dict"][name]) for name in state)


def test_load_induction_is_in_eval_mode_and_draws_no_random_numbers():
    before = torch.get_rng_state()
    net = load_induction()
    assert torch.equal(torch.get_rng_state(), before)
    assert not net.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())  # gradients of activations work
    assert net.config == TinyLMConfig(
        vocab_size=64, width=64, heads=4, layers=2, max_positions=64, bos_token_id=0, mlp=False
    )
    assert net.layers[0].ln2 is None and net.layers[0].mlp is None
    assert sum(p.numel() for p in net.parameters()) == 45_952


def test_the_weights_ship_in_the_package_data():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"weights/*.pt"' in pyproject
    assert INDUCTION_WEIGHTS.parent == Path(mediator.__file__).resolve().parent / "weights"
    with zipfile.ZipFile(INDUCTION_WEIGHTS) as archive:  # torch's zip format, not a bare pickle
        assert any(name.endswith("data.pkl") for name in archive.namelist())


# -- what it does -----------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "repeat_at_least"), [(4, 0.99), (20, 0.99), (31, 0.95)])
def test_predicts_the_repeat_and_not_the_first_half(induction, length, repeat_at_least):
    ids = repeated_tokens(500, length, generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        hits = induction(ids)[:, :-1].argmax(-1) == ids[:, 1:]
    assert hits[:, length + 1 :].float().mean() >= repeat_at_least  # documented 1.000 / 0.967
    assert hits[:, :length].float().mean() < 0.01  # documented 0.001-0.004; chance 0.016


def test_attention_by_hand_equals_the_pattern_points_and_the_logits(induction, ids):
    seen: list[torch.Tensor] = []
    handles = [
        block.attn.pattern.register_forward_hook(lambda m, a, o: seen.append(o))
        for block in induction.layers
    ]
    try:
        with torch.no_grad():
            logits = induction(ids)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        patterns, expected = by_hand(induction, ids)
    for got, want in zip(seen, patterns, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_documented_head_scores(induction, ids):
    with torch.no_grad():
        patterns, _ = by_hand(induction, ids)
    previous, _ = scores(patterns[0], LENGTH)
    _, inducing = scores(patterns[1], LENGTH)
    for (layer, head), documented in PREVIOUS_TOKEN_SCORES.items():
        assert abs(previous[head].item() - documented) < 0.006, (layer, head)
    for (layer, head), documented in INDUCTION_SCORES.items():
        assert abs(inducing[head].item() - documented) < 0.006, (layer, head)
    assert PREVIOUS_TOKEN_HEAD == (0, int(previous.argmax()))
    assert set(INDUCTION_HEADS) == {(1, head) for head in range(4) if inducing[head] > 0.8}
    # and the other way round: no induction in layer 0, no previous-token head in layer 1
    assert scores(patterns[0], LENGTH)[1].max() < 0.1
    assert scores(patterns[1], LENGTH)[0].max() < 0.2


def test_documented_ablations(induction, ids):
    """Zeroing heads (a forward hook on `attn.heads`): the repeat needs layer 0 head 2 (helped by
    heads 0 and 1) and any of the four induction heads."""

    def accuracy_without(layer: int, heads: list[int]) -> float:
        def zero(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, :, heads] = 0
            return out

        handle = induction.layers[layer].attn.heads.register_forward_hook(zero)
        try:
            with torch.no_grad():
                hits = induction(ids)[:, LENGTH + 1 : -1].argmax(-1) == ids[:, LENGTH + 2 :]
        finally:
            handle.remove()
        return hits.float().mean().item()

    assert 0.5 < accuracy_without(0, [PREVIOUS_TOKEN_HEAD[1]]) < 0.7  # documented 0.59
    assert accuracy_without(0, [0, 1, 2]) < 0.1  # documented 0.07
    assert accuracy_without(0, [3]) > 0.99
    for head in range(4):
        assert accuracy_without(1, [head]) > 0.99
    assert accuracy_without(1, [0, 1, 2, 3]) < 0.05  # documented 0.017


# -- TinyLM's named attention values ----------------------------------------------------------


def test_heads_and_pattern_points_hold_the_attention_values(induction):
    ids = repeated_tokens(2, 5, generator=torch.Generator().manual_seed(3))
    model = mediator.Model(induction)
    with torch.no_grad(), model.trace(ids):
        pattern = model.layers[1].attn.pattern.output
        heads = model.layers[1].attn.heads.output
        attn = model.layers[1].attn.output
    patterns, _ = by_hand(induction, ids)
    assert pattern.shape == (2, 4, 11, 11) and heads.shape == (2, 11, 4, 16)
    torch.testing.assert_close(pattern, patterns[1], atol=1e-5, rtol=0)
    out = induction.layers[1].attn.out
    torch.testing.assert_close(out(heads.flatten(2)), attn, atol=0, rtol=0)
    assert_untouched(induction)


def test_editing_one_head_equals_a_forward_hook(induction):
    ids = repeated_tokens(3, 6, generator=torch.Generator().manual_seed(4))

    def zero_head(module: torch.nn.Module, args: object, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, :, 3] = 0
        return out

    handle = induction.layers[1].attn.heads.register_forward_hook(zero_head)
    try:
        expected = induction(ids)
    finally:
        handle.remove()
    model = mediator.Model(induction)
    with model.trace(ids):
        model.layers[1].attn.heads.output[:, :, 3] = 0
        got = model.output
    assert torch.equal(got, expected)
    assert not torch.equal(got, induction(ids))


def test_attention_only_config_and_default_tinylm_tree():
    assert [name for name, _ in TinyLM().layers[0].named_children()] == [
        "ln1",
        "attn",
        "ln2",
        "mlp",
    ]
    assert [name for name, _ in TinyLM().layers[0].attn.named_children()] == [
        "qkv",
        "pattern",
        "heads",
        "out",
    ]
    only = TinyLM(TinyLMConfig(mlp=False))
    assert [name for name, _ in only.layers[0].named_children()] == ["ln1", "attn"]


def test_repeated_tokens():
    ids = repeated_tokens(50, 30, generator=torch.Generator().manual_seed(5))
    assert ids.shape == (50, 61) and ids.dtype == torch.long
    assert (ids[:, 0] == 0).all() and (ids[:, 1:] > 0).all() and (ids < 64).all()
    assert torch.equal(ids[:, 1:31], ids[:, 31:])
    assert all(len(set(row[1:31].tolist())) == 30 for row in ids)  # distinct tokens
    other = repeated_tokens(2, 3, vocab_size=10, bos_token_id=9)
    assert (other[:, 0] == 9).all() and (other[:, 1:] < 9).all()
    assert repeated_tokens(1, 63).shape == (1, 127)
    for bad in (0, 64):
        with pytest.raises(ValueError, match="length"):
            repeated_tokens(1, bad)


def test_induction_prompts(induction):
    clean, corrupt, answer = induction_prompts(
        40, 10, 6, generator=torch.Generator().manual_seed(6)
    )
    assert clean.shape == corrupt.shape == (40, 17) and answer.shape == (40,)
    assert torch.equal(clean[:, 11:], clean[:, 1:7])  # BOS r1..r10 r1..r6
    assert torch.equal(answer, clean[:, 7])
    changed = (clean != corrupt).nonzero()[:, 1]
    assert (changed == 6).all() and len(changed) == 40
    for row, token in zip(corrupt.tolist(), corrupt[:, 6].tolist(), strict=True):
        assert row.count(token) == 1  # found nowhere else
    with torch.no_grad():
        assert (induction(clean)[:, -1].argmax(-1) == answer).all()
        assert (induction(corrupt)[:, -1].argmax(-1) != answer).float().mean() > 0.75
    for bad in (0, 10):
        with pytest.raises(ValueError, match="cut"):
            induction_prompts(1, 10, bad)


# -- the training script ----------------------------------------------------------------------


def _train_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_induction", TRAIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_is_deterministic():
    train = _train_module().train
    first, second = train(3, 8, 3e-3, 0), train(3, 8, 3e-3, 0)
    pairs = zip(first.parameters(), second.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(first.embed.weight, train(3, 8, 3e-3, 1).embed.weight)
