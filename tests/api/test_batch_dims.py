"""Rows follow each value's real batch dimension (issue 11 case 2).

RNN states (`[layers, batch, H]`, also when `layers` equals the batch size) and sequence-first
inputs, beam search and `num_return_sequences`, key/value cache objects, per-module overrides
(`Batcher(batch_dims=...)`), and the error where the rows cannot be told. Oracles: the same
module run alone on each invoke's inputs (plain calls, or plain `generate` with forward hooks
for the edits).
"""

# ruff: noqa: B007, B018, F841

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import assert_untouched, tiny_gpt2
from torch import nn

import mediator

# ---------------------------------------------------------------------------------------------
# RNNs: two invokes of one row each, num_layers == 2 == the total batch size
# ---------------------------------------------------------------------------------------------

RNNS = [
    pytest.param(nn.LSTM, True, id="lstm-batch-first"),
    pytest.param(nn.LSTM, False, id="lstm-seq-first"),
    pytest.param(nn.GRU, True, id="gru-batch-first"),
    pytest.param(nn.GRU, False, id="gru-seq-first"),
]


def make_rnn(kind: type[nn.RNNBase], batch_first: bool) -> nn.RNNBase:
    torch.manual_seed(1)
    return kind(4, 8, num_layers=2, batch_first=batch_first).eval()


def sequence(batch_first: bool, seed: int) -> torch.Tensor:
    """One row of 3 steps: [1, 3, 4] batch-first, [3, 1, 4] sequence-first."""
    torch.manual_seed(seed)
    x = torch.randn(1, 3, 4)
    return x if batch_first else x.transpose(0, 1).contiguous()


def states(kind: type[nn.RNNBase], seed: int) -> Any:
    """An initial state for one row: `[layers, 1, H]` (a pair for an LSTM)."""
    torch.manual_seed(seed)
    h = torch.randn(2, 1, 8)
    return (h, torch.randn(2, 1, 8)) if kind is nn.LSTM else h


def last_state(output: Any) -> torch.Tensor:
    """`h_n` of an RNN's output `(sequence, h_n)` or `(sequence, (h_n, c_n))`."""
    state = output[1]
    return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize(("kind", "batch_first"), RNNS)
def test_rnn_reads_of_output_and_state_equal_solo(kind, batch_first):
    rnn = make_rnn(kind, batch_first)
    model = mediator.Model(rnn)
    x1, x2 = sequence(batch_first, 2), sequence(batch_first, 3)
    with model.trace() as tr:
        with tr.invoke(x1):
            out1 = model.output
            own = tr.result
        with tr.invoke(x2):
            out2 = model.output
    for got, x in ((out1, x1), (out2, x2), (own, x1)):
        solo = rnn(x)
        torch.testing.assert_close(got[0], solo[0])
        torch.testing.assert_close(last_state(got), last_state(solo))
    assert_untouched(rnn)


@pytest.mark.parametrize(("kind", "batch_first"), RNNS)
def test_rnn_initial_state_input_is_batched_on_dim_1(kind, batch_first):
    rnn = make_rnn(kind, batch_first)
    model = mediator.Model(rnn)
    (x1, h1), (x2, h2) = (
        (sequence(batch_first, 4), states(kind, 5)),
        (
            sequence(batch_first, 6),
            states(kind, 7),
        ),
    )
    with model.trace() as tr:
        with tr.invoke(x1, h1):
            args1, _ = model.inputs
        with tr.invoke(x2, h2):
            args2, _ = model.inputs
            out2 = model.output
    torch.testing.assert_close(args1[0], x1)
    torch.testing.assert_close(args2[1], h2)
    solo = rnn(x2, h2)
    torch.testing.assert_close(out2[0], solo[0])
    torch.testing.assert_close(last_state(out2), last_state(solo))


@pytest.mark.parametrize(("kind", "batch_first"), RNNS)
def test_rnn_state_edit_stays_in_its_invoke(kind, batch_first):
    """Zeroing invoke 0's final state and its sequence output changes its rows only."""
    rnn = make_rnn(kind, batch_first)
    model = mediator.Model(rnn)
    x1, x2 = sequence(batch_first, 8), sequence(batch_first, 9)
    with model.trace() as tr:
        with tr.invoke(x1):
            last_state(model.output)[:] = 0
            model.output[0][:] = 0
        with tr.invoke(x2):
            out2 = model.output
    full = tr.result
    seq_dim = 0 if batch_first else 1
    solo = rnn(x2)
    assert full[0].select(seq_dim, 0).abs().sum() == 0
    assert last_state(full)[:, 0].abs().sum() == 0
    torch.testing.assert_close(full[0].select(seq_dim, 1), solo[0].select(seq_dim, 0))
    torch.testing.assert_close(last_state(full)[:, 1], last_state(solo)[:, 0])
    torch.testing.assert_close(out2[0], solo[0])


class Encoder(nn.Module):
    """A batch-first LSTM whose last layer's final state feeds a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.rnn = nn.LSTM(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.rnn(x)
        return self.head(h[-1])


def test_rnn_inside_a_model_state_edit_equals_hooked_solo():
    net = Encoder().eval()
    model = mediator.Model(net)
    x1, x2 = sequence(True, 11), sequence(True, 12)
    with model.trace() as tr:
        with tr.invoke(x1):
            model.rnn.output[1][0][-1] *= 2
            y1 = model.output
        with tr.invoke(x2):
            h2 = model.rnn.output[1][0]
            y2 = model.output

    def double_last(module: nn.Module, args: Any, output: Any) -> None:
        output[1][0][-1] *= 2

    handle = net.rnn.register_forward_hook(double_last)
    try:
        expected1 = net(x1)
    finally:
        handle.remove()
    torch.testing.assert_close(y1, expected1)
    torch.testing.assert_close(y2, net(x2))
    torch.testing.assert_close(h2, net.rnn(x2)[1][0])


# ---------------------------------------------------------------------------------------------
# Overrides and the error where rows cannot be told
# ---------------------------------------------------------------------------------------------


class Stacked(nn.Module):
    """Returns `[2, batch, H]`: two scaled copies of its input, stacked (batch on dim 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x, 2 * x])


class StackNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.proj = nn.Linear(4, 4)
        self.stack = Stacked()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(self.proj(x)).sum(0))


def test_override_batch_dims_per_module_equals_solo():
    net = StackNet().eval()
    batcher = mediator.Batcher(batch_dims={"stack": mediator.BatchDims(inputs=0, output=1)})
    model = mediator.Model(net, batcher=batcher)
    torch.manual_seed(14)
    x1, x2 = torch.randn(1, 4), torch.randn(1, 4)
    with model.trace() as tr:
        with tr.invoke(x1):
            s1 = model.stack.output
            model.stack.output[0] = 0
            y1 = model.output
        with tr.invoke(x2):
            s2 = model.stack.output
            y2 = model.output
    assert s1.shape == s2.shape == (2, 1, 4)
    torch.testing.assert_close(s2, net.stack(net.proj(x2)))
    torch.testing.assert_close(y2, net(x2))
    torch.testing.assert_close(y1, net.head(2 * net.proj(x1)))


def test_override_dim_that_does_not_hold_the_batch_is_shape_error():
    net = StackNet().eval()
    model = mediator.Model(net, batcher=mediator.Batcher(batch_dims={"proj": 1}))
    with pytest.raises(mediator.ShapeError, match=r"proj\.output.*\[2, 4\].*dim 1.*batch_dims"):
        with model.trace() as tr:
            with tr.invoke(torch.randn(1, 4)):
                model.proj.output
            with tr.invoke(torch.randn(1, 4)):
                pass
    assert_untouched(net)


def test_override_of_a_path_the_model_lacks_is_usage_error():
    with pytest.raises(mediator.UsageError, match=r"'stak'.*Closest: 'stack'"):
        mediator.Model(StackNet(), batcher=mediator.Batcher(batch_dims={"stak": 1}))


class Tagger(nn.Module):
    """A sequence-first LSTM ([T, batch, F]) inside a model: the model's batch dim is unknown."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(15)
        self.rnn = nn.LSTM(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def test_inputs_of_a_model_holding_a_sequence_first_layer_are_shape_error():
    net = Tagger().eval()
    model = mediator.Model(net)
    x1, x2 = sequence(False, 16), sequence(False, 17)
    with pytest.raises(mediator.ShapeError, match=r"Tagger holds the sequence-first layer 'rnn'"):
        with model.trace() as tr:
            with tr.invoke(x1):
                pass
            with tr.invoke(x2):
                pass
    with model.trace(x1):  # one invoke: nothing is concatenated or narrowed
        alone = model.rnn.output[0]
    torch.testing.assert_close(alone, net.rnn(x1)[0])


def test_declared_sequence_first_model_is_batched_on_dim_1():
    net = Tagger().eval()
    batcher = mediator.Batcher(batch_dims={"": 1, "head": 1})
    model = mediator.Model(net, batcher=batcher)
    x1, x2 = sequence(False, 18), sequence(False, 19)
    with model.trace() as tr:
        with tr.invoke(x1):
            y1 = model.output
        with tr.invoke(x2):
            out2 = model.rnn.output[0]
            model.head.output[:] = 0
    torch.testing.assert_close(y1, net(x1))
    torch.testing.assert_close(out2, net.rnn(x2)[0])
    assert tr.result[:, 1].abs().sum() == 0


class SeqFirstBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(20)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("layer", "TransformerEncoderLayer is a sequence-first layer"),
        ("layer.linear1", "Linear runs inside the sequence-first layer 'layer'"),
    ],
)
def test_reading_a_sequence_first_module_is_shape_error_naming_it(path, reason):
    net = SeqFirstBlock().eval()
    model = mediator.Model(net, batcher=mediator.Batcher(batch_dims={"": 1}))
    envoy = model.layer if path == "layer" else model.layer.linear1
    torch.manual_seed(21)
    x1, x2 = torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    expected = rf"{path}\.output.*invoke 0.*{reason}.*batch_dims"
    with pytest.raises(mediator.ShapeError, match=expected):
        with model.trace() as tr:
            with tr.invoke(x1):
                envoy.output
            with tr.invoke(x2):
                pass
    assert_untouched(net)


def test_declared_sequence_first_layer_reads_equal_solo():
    net = SeqFirstBlock().eval()
    model = mediator.Model(net, batcher=mediator.Batcher(batch_dims={"": 1, "layer": 1}))
    torch.manual_seed(22)
    x1, x2 = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with model.trace() as tr:
        with tr.invoke(x1):
            y1 = model.layer.output
        with tr.invoke(x2):
            y2 = model.output
    torch.testing.assert_close(y1, net(x1))
    torch.testing.assert_close(y2, net(x2))


# ---------------------------------------------------------------------------------------------
# Hugging Face generation: beam search, num_return_sequences, key/value caches
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return tiny_gpt2(30, n_positions=32, eos_token_id=None, bos_token_id=None, pad_token_id=0)


PROMPTS = (torch.tensor([[5, 17, 42, 8]]), torch.tensor([[61, 3, 29, 77]]))


def hooked_generate(net: nn.Module, ids: torch.Tensor, edit: bool, **options: Any) -> Any:
    """`net.generate` alone; with `edit`, the first block's output is zeroed at its first call
    (the prompt's forward pass)."""
    calls = [0]

    def zero(module: nn.Module, args: Any, output: Any) -> None:
        if calls[0] == 0:
            output.zero_()
        calls[0] += 1

    handle = net.transformer.h[0].register_forward_hook(zero) if edit else None
    try:
        return net.generate(ids, **options)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"num_beams": 2}, id="beams"),
        pytest.param({"num_beams": 2, "num_return_sequences": 2}, id="beams-returning-2"),
        pytest.param({"num_beams": 3, "num_return_sequences": 2}, id="3-beams-returning-2"),
    ],
)
def test_beam_search_invokes_own_their_expanded_rows(gpt2, options):
    options = {"max_new_tokens": 3, "do_sample": False, **options}
    expand = options["num_beams"]
    model = mediator.Model(gpt2)
    with model.generate(**options) as tr:
        with tr.invoke(PROMPTS[0]):
            model.transformer.h[0].output[:] = 0
            tokens1 = tr.result
        with tr.invoke(PROMPTS[1]):
            first2 = model.transformer.h[0].output.clone()
            tokens2 = tr.result
    hidden: list[torch.Tensor] = []
    handle = gpt2.transformer.h[0].register_forward_hook(lambda m, a, o: hidden.append(o.clone()))
    try:
        expected2 = gpt2.generate(PROMPTS[1], **options)
    finally:
        handle.remove()
    assert first2.shape[0] == expand
    torch.testing.assert_close(first2, hidden[0])
    torch.testing.assert_close(tokens2, expected2)
    torch.testing.assert_close(tokens1, hooked_generate(gpt2, PROMPTS[0], True, **options))
    assert tr.result.shape[0] == 2 * options.get("num_return_sequences", 1)
    assert_untouched(gpt2)


def cache_of(output: Any) -> Any:
    """The cache in a model output (its key by version)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def test_cache_read_holds_only_the_invokes_rows(gpt2):
    model = mediator.Model(gpt2)
    with model.trace() as tr:
        with tr.invoke(PROMPTS[0]):
            cache1 = cache_of(model.transformer.output)
            keys1 = [layer.keys.clone() for layer in cache1.layers]
        with tr.invoke(PROMPTS[1]):
            cache2 = cache_of(model.transformer.output)
            keys2 = [layer.values.clone() for layer in cache2.layers]
    full = cache_of(tr.result)
    assert type(cache1) is type(full)
    solo1, solo2 = cache_of(gpt2(PROMPTS[0])), cache_of(gpt2(PROMPTS[1]))
    for layer, keys in enumerate(keys1):
        torch.testing.assert_close(keys, solo1.layers[layer].keys)
    for layer, values in enumerate(keys2):
        torch.testing.assert_close(values, solo2.layers[layer].values)


def generate_with_zeroed_keys(net: nn.Module, ids: torch.Tensor, **options: Any) -> Any:
    """Plain `generate` that zeroes layer 0's cached keys after the prompt's forward pass."""
    calls = [0]

    def zero_keys(module: nn.Module, args: Any, output: Any) -> None:
        if calls[0] == 0:
            cache_of(output).layers[0].keys.zero_()
        calls[0] += 1

    handle = net.transformer.register_forward_hook(zero_keys)
    try:
        return net.generate(ids, **options)
    finally:
        handle.remove()


@pytest.mark.parametrize("num_beams", [1, 2])
def test_in_place_cache_edit_reaches_only_its_rows(gpt2, num_beams):
    options = {
        "max_new_tokens": 3,
        "do_sample": False,
        "num_beams": num_beams,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    model = mediator.Model(gpt2)
    with model.generate(**options) as tr:
        with tr.invoke(PROMPTS[0]):
            cache_of(model.transformer.output).layers[0].keys.zero_()
            edited = tr.result
        with tr.invoke(PROMPTS[1]):
            other = tr.result
    solo_other = gpt2.generate(PROMPTS[1], **options)
    solo_edited = generate_with_zeroed_keys(gpt2, PROMPTS[0], **options)
    torch.testing.assert_close(other.sequences, solo_other.sequences)
    torch.testing.assert_close(edited.sequences, solo_edited.sequences)
    for got, want in zip(other.scores, solo_other.scores, strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(edited.scores, solo_edited.scores, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(edited.scores[1], gpt2.generate(PROMPTS[0], **options).scores[1])


def test_replaced_cache_is_merged_into_its_rows(gpt2):
    options = {"max_new_tokens": 2, "do_sample": False}
    model = mediator.Model(gpt2)
    with model.generate(**options) as tr:
        with tr.invoke(PROMPTS[0]):
            output = model.transformer.output
            cache = copy.deepcopy(cache_of(output))
            cache.layers[0].keys = torch.zeros_like(cache.layers[0].keys)
            model.transformer.output = type(output)(
                last_hidden_state=output.last_hidden_state, **{_cache_key(output): cache}
            )
            edited = tr.result
        with tr.invoke(PROMPTS[1]):
            other = tr.result
    torch.testing.assert_close(other, gpt2.generate(PROMPTS[1], **options))
    torch.testing.assert_close(edited, generate_with_zeroed_keys(gpt2, PROMPTS[0], **options))


def _cache_key(output: Any) -> str:
    return "cache" if "cache" in output else "past_key_values"


def test_cache_input_of_attention_holds_only_the_invokes_rows(gpt2):
    """At step 1 the first attention is called with the cache of the prompt's pass."""
    model = mediator.Model(gpt2)
    with model.generate(max_new_tokens=2, do_sample=False) as tr:
        with tr.invoke(PROMPTS[0]):
            for step in tr.iter[1]:
                keys1 = model.transformer.h[0].attn.inputs[1]["cache"].layers[0].keys.clone()
        with tr.invoke(PROMPTS[1]):
            for step in tr.iter[1]:
                values2 = model.transformer.h[0].attn.inputs[1]["cache"].layers[0].values.clone()
    torch.testing.assert_close(keys1, cache_of(gpt2(PROMPTS[0])).layers[0].keys)
    torch.testing.assert_close(values2, cache_of(gpt2(PROMPTS[1])).layers[0].values)


def test_a_cache_read_before_its_layers_are_filled_never_shares_them(gpt2):
    """At step 0 the first block gets a cache whose layers are still empty; the model fills them
    in place as it goes. An invoke's view of it is a snapshot of its own rows (nothing yet): the
    model's later writes of every invoke's keys must not land in it, and the invoke's in-place
    edit of what it holds must not reach another invoke."""
    model = mediator.Model(gpt2)
    kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        solo = gpt2.generate(PROMPTS[1], **kwargs)
        with model.generate(**kwargs) as tr:
            with tr.invoke(PROMPTS[0]):
                args, kwargs = model.transformer.h[0].inputs
                cache = next(v for v in (*args, *kwargs.values()) if hasattr(v, "layers"))
                _ = model.transformer.h[1].output
                seen = [layer.keys for layer in cache.layers]
            with tr.invoke(PROMPTS[1]):
                pass
    assert seen == [None] * len(seen)  # alone, the same object is filled later: a snapshot
    torch.testing.assert_close(tr.result[1:], solo)


def test_every_invoke_skipping_under_beam_search_equals_solo(gpt2):
    """Every invoke skips the second block at every step: the joined skip values hold
    `num_beams` rows per prompt, like the module's own output would."""
    options = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "pad_token_id": 0}
    model = mediator.Model(gpt2)

    def skipping(ids: torch.Tensor) -> torch.Tensor:
        with model.generate(ids, **options) as tr:
            for step in tr.iter[:]:
                model.transformer.h[1].skip(model.transformer.h[0].output)
        return tr.result

    with torch.no_grad():
        solo = [skipping(prompt) for prompt in PROMPTS]
        with model.generate(**options) as tr:
            for prompt in PROMPTS:
                with tr.invoke(prompt):
                    for step in tr.iter[:]:
                        model.transformer.h[1].skip(model.transformer.h[0].output)
    torch.testing.assert_close(tr.result, torch.cat(solo))
    assert_untouched(gpt2)
