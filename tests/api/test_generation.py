"""Generation traces (`model.generate(...)`, `tr.iter[...]`) and causal-LM batching.

Part 1 uses the built-in `mediator.models.TinyLM` (no transformers). Part 2 builds tiny GPT-2 and
Llama models from configs with random weights (nothing is downloaded). Oracles are plain PyTorch:
forward hooks on the same module during the module's own `generate`/forward, and solo runs of
each prompt for batched invokes of different lengths (left padding).
"""

# ruff: noqa: B007, B018, F841

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_untouched, tiny_gpt2, tiny_llama
from torch import nn

import mediator
from mediator.models import TinyLM, TinyLMConfig

NEW = 4  # new tokens per generation


def hooked_generate(
    net: nn.Module,
    ids: torch.Tensor,
    hooks: dict[nn.Module, Callable[[int, Any], Any]] | None = None,
    **options: Any,
) -> torch.Tensor:
    """`net.generate(ids, **options)` with forward hooks `hooks[m](call, output)` (each may edit
    the output in place or return a replacement), removed afterwards."""
    handles = []
    try:
        for module, fn in (hooks or {}).items():
            calls = [0]

            def hook(m: nn.Module, a: Any, o: Any, fn: Any = fn, calls: list[int] = calls) -> Any:
                call = calls[0]
                calls[0] += 1
                return fn(call, o)

            handles.append(module.register_forward_hook(hook))
        return net.generate(ids, **options)
    finally:
        for handle in handles:
            handle.remove()


def collect(record: list[Any]) -> Callable[[int, Any], None]:
    def keep(call: int, o: Any) -> None:
        record.append(o)

    return keep


def unpad(rows: torch.Tensor, length: int) -> torch.Tensor:
    """An invoke's generated rows without the left padding of its prompt of `length` tokens."""
    longest_prompt_and_new = rows.shape[1]
    return rows[:, longest_prompt_and_new - length - NEW :]


# =============================================================================================
# Part 1: TinyLM (no transformers)
# =============================================================================================


@pytest.fixture
def tiny():
    torch.manual_seed(11)
    net = TinyLM(TinyLMConfig()).eval()
    yield net
    assert_untouched(net)


@pytest.fixture
def prompts():
    torch.manual_seed(12)
    return torch.randint(1, 64, (1, 7)), torch.randint(1, 64, (1, 4))


@pytest.fixture
def vec():
    torch.manual_seed(13)
    return torch.randn(32) * 6.0


def steer_last(vec: torch.Tensor, steps: set[int] | None = None) -> Callable[[int, Any], None]:
    """A hook body that adds `vec` to the last position on the chosen calls (all if None)."""

    def edit(call: int, o: torch.Tensor) -> None:
        if steps is None or call in steps:
            o[:, -1] += vec

    return edit


def test_tiny_steps_are_prompt_then_new_tokens(tiny, prompts):
    ids = prompts[0]
    model = mediator.Model(tiny)
    record: list[torch.Tensor] = []
    expected = hooked_generate(tiny, ids, {tiny.lm_head: collect(record)}, max_new_tokens=NEW)
    assert len(record) == NEW
    with model.generate(ids, max_new_tokens=NEW) as tr:
        logits = []
        shapes = []
        for step in tr.iter[:]:
            out = model.lm_head.output
            logits.append(out)
            shapes.append((step, tuple(out.shape)))
        count = len(logits)  # after the open loop
    assert count == NEW
    prompt = ids.shape[1]
    assert shapes == [(k, (1, prompt + k, 64)) for k in range(NEW)]
    for got, want in zip(logits, record, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(tr.result, expected)
    # step k's logits predict token k
    for k, got in enumerate(logits):
        assert int(got[0, -1].argmax()) == int(expected[0, prompt + k])


def test_tiny_steps_function_form(tiny, prompts):
    ids = prompts[1]
    model = mediator.Model(tiny)
    record: list[torch.Tensor] = []
    expected = hooked_generate(tiny, ids, {tiny.layers[1]: collect(record)}, max_new_tokens=NEW)

    def body(tr: mediator.Tracer) -> tuple[list[torch.Tensor], torch.Tensor]:
        hidden = [model.layers[1].output for _ in tr.all()]
        return hidden, tr.result

    with model.generate(max_new_tokens=NEW) as tr:
        future = tr.invoke(ids).run(body, tr)
    hidden, tokens = future.result()
    assert len(hidden) == NEW
    for k, (got, want) in enumerate(zip(hidden, record, strict=True)):
        assert got.shape == (1, ids.shape[1] + k, 32)
        assert torch.equal(got, want)
    assert torch.equal(tokens, expected)


def test_tiny_steering_every_step_equals_hook(tiny, prompts, vec):
    ids = prompts[0]
    model = mediator.Model(tiny)
    plain = tiny.generate(ids, max_new_tokens=NEW)
    expected = hooked_generate(tiny, ids, {tiny.layers[0]: steer_last(vec)}, max_new_tokens=NEW)
    assert not torch.equal(plain, expected), "the steering vector must change the tokens"
    with model.generate(ids, max_new_tokens=NEW) as tr:
        for step in tr.iter[:]:
            model.layers[0].output[:, -1] += vec
    assert torch.equal(tr.result, expected)


def test_tiny_steering_every_step_function_form_swap(tiny, prompts, vec):
    ids = prompts[0]
    model = mediator.Model(tiny)
    expected = hooked_generate(tiny, ids, {tiny.layers[0]: steer_last(vec)}, max_new_tokens=NEW)

    def steer(tr: mediator.Tracer) -> torch.Tensor:
        for _ in tr.iter[:]:
            h = model.layers[0].output.clone()
            h[:, -1] += vec
            model.layers[0].output = h
        return tr.result

    with model.generate(max_new_tokens=NEW) as tr:
        future = tr.invoke(ids).run(steer, tr)
    assert torch.equal(future.result(), expected)
    assert torch.equal(tr.result, expected)


@pytest.mark.parametrize("form", ["body", "function", "open_loop"])
def test_tiny_steering_only_at_step_two(tiny, prompts, vec, form):
    ids = prompts[1]
    model = mediator.Model(tiny)
    expected = hooked_generate(
        tiny, ids, {tiny.layers[0]: steer_last(vec, {2})}, max_new_tokens=NEW
    )
    everywhere = hooked_generate(tiny, ids, {tiny.layers[0]: steer_last(vec)}, max_new_tokens=NEW)
    plain = tiny.generate(ids, max_new_tokens=NEW)
    prompt = ids.shape[1]
    # tokens before step 2 are untouched; step 2 onwards differ from the plain run
    assert torch.equal(expected[:, : prompt + 2], plain[:, : prompt + 2])
    assert not torch.equal(expected, plain)
    assert not torch.equal(expected, everywhere)
    if form == "body":
        with model.generate(ids, max_new_tokens=NEW) as tr:
            for step in tr.iter[2]:
                model.layers[0].output[:, -1] += vec
    elif form == "open_loop":
        with model.generate(ids, max_new_tokens=NEW) as tr:
            visited = []
            for step in tr.iter[:]:
                visited.append(step)
                if step == 2:
                    model.layers[0].output[:, -1] += vec
        assert visited == list(range(NEW))
    else:

        def steer(tr: mediator.Tracer) -> None:
            for _ in tr.iter[2]:
                model.layers[0].output[:, -1] += vec

        with model.generate(max_new_tokens=NEW) as tr:
            tr.invoke(ids).run(steer, tr)
    assert torch.equal(tr.result, expected)


def test_tiny_step_beyond_generation_is_missed_provider(tiny, prompts):
    ids = prompts[1]
    model = mediator.Model(tiny)
    with pytest.raises(mediator.MissedProviderError) as info:
        with model.generate(ids, max_new_tokens=2) as tr:
            for step in tr.iter[[1, 5]]:
                model.lm_head.output
    message = str(info.value)
    assert "lm_head" in message and "5" in message


def test_tiny_batched_prompts_equal_solo_generations(tiny, prompts):
    a, b = prompts
    assert a.shape[1] != b.shape[1]
    model = mediator.Model(tiny)
    solo_a = tiny.generate(a, max_new_tokens=NEW)
    solo_b = tiny.generate(b, max_new_tokens=NEW)
    with model.generate(max_new_tokens=NEW) as tr:
        with tr.invoke(a):
            rows_a = tr.result
        with tr.invoke(b):
            first_b = model.lm_head.output
            rows_b = tr.result
    longest = max(a.shape[1], b.shape[1])
    assert rows_a.shape == (1, longest + NEW) and rows_b.shape == (1, longest + NEW)
    assert torch.equal(unpad(rows_a, a.shape[1]), solo_a)
    assert torch.equal(unpad(rows_b, b.shape[1]), solo_b)
    # left padding: b's rows start with pad tokens, and its step-0 logits at real tokens match
    assert torch.equal(
        rows_b[:, : longest - b.shape[1]], torch.zeros(1, longest - b.shape[1]).long()
    )
    assert first_b.shape == (1, longest, 64)
    assert torch.allclose(first_b[:, longest - b.shape[1] :], tiny(b), atol=1e-5)
    assert tr.result.shape == (2, longest + NEW)


@pytest.mark.parametrize("form", ["body", "function"])
def test_tiny_edit_in_one_invoke_leaves_other_unchanged(tiny, prompts, vec, form):
    a, b = prompts
    model = mediator.Model(tiny)
    steered_b = hooked_generate(tiny, b, {tiny.layers[0]: steer_last(vec)}, max_new_tokens=NEW)
    solo_a = tiny.generate(a, max_new_tokens=NEW)
    solo_b = tiny.generate(b, max_new_tokens=NEW)
    assert not torch.equal(steered_b, solo_b)
    if form == "body":
        with model.generate(max_new_tokens=NEW) as tr:
            with tr.invoke(a):
                rows_a = tr.result
            with tr.invoke(b):
                for step in tr.iter[:]:
                    model.layers[0].output[:, -1] += vec
                rows_b = tr.result
    else:

        def steer(tr: mediator.Tracer) -> torch.Tensor:
            for _ in tr.iter[:]:
                model.layers[0].output[:, -1] += vec
            return tr.result

        with model.generate(max_new_tokens=NEW) as tr:
            fa = tr.invoke(a).run(lambda: tr.result)
            fb = tr.invoke(b).run(steer, tr)
        rows_a, rows_b = fa.result(), fb.result()
    assert torch.equal(unpad(rows_a, a.shape[1]), solo_a)
    assert torch.equal(unpad(rows_b, b.shape[1]), steered_b)


def test_tiny_per_step_reads_in_batched_invokes_match_batched_hooks(tiny, prompts):
    """Each invoke's per-step reads are its rows of what a hook sees in the same batched run."""
    a, b = prompts
    model = mediator.Model(tiny)
    longest = a.shape[1]
    pad = longest - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad).long(), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    record: list[torch.Tensor] = []
    handle = tiny.lm_head.register_forward_hook(lambda m, i, o: record.append(o))
    try:
        expected = tiny.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    finally:
        handle.remove()
    with model.generate(max_new_tokens=NEW) as tr:
        with tr.invoke(a):
            la = [model.lm_head.output for _ in tr.iter[:]]
        with tr.invoke(b):
            lb = [model.lm_head.output for _ in tr.iter[0:NEW]]
    assert len(la) == len(lb) == NEW
    for k in range(NEW):
        assert torch.equal(la[k], record[k][:1])
        assert torch.equal(lb[k], record[k][1:])
    assert torch.equal(tr.result, expected)


def test_generate_on_model_without_generate_is_usage_error(net, x):
    model = mediator.Model(net)
    with pytest.raises(mediator.UsageError):
        model.generate(x, max_new_tokens=2)


# =============================================================================================
# Part 2: Hugging Face causal LMs built from configs (nothing downloaded)
# =============================================================================================


def _gpt2() -> nn.Module:
    return tiny_gpt2(21, n_embd=64, n_head=4, n_positions=64, eos_token_id=None, bos_token_id=None)


def _llama() -> nn.Module:
    return tiny_llama(
        22,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )


@pytest.fixture(params=["gpt2", "llama"])
def hf(request):
    net = _gpt2() if request.param == "gpt2" else _llama()
    yield request.param, net
    assert_untouched(net)


def first_block(model: Any, kind: str) -> Any:
    return model.transformer.h[0] if kind == "gpt2" else model.model.layers[0]


def hidden_of(output: Any) -> torch.Tensor:
    """A decoder block's hidden states: the output itself or its first element (by version)."""
    return output[0] if isinstance(output, tuple) else output


@pytest.fixture
def hf_prompts():
    torch.manual_seed(23)
    return torch.randint(1, 100, (1, 6)), torch.randint(1, 100, (1, 3))


GREEDY = {"max_new_tokens": 3, "do_sample": False}


def test_hf_trace_batched_prompts_logits_equal_solo(hf, hf_prompts):
    kind, net = hf
    a, b = hf_prompts
    model = mediator.Model(net)
    with torch.no_grad():
        solo_a = net(a).logits
        solo_b = net(b).logits
    with torch.no_grad():
        with model.trace() as tr:
            with tr.invoke(a):
                la = model.lm_head.output
            with tr.invoke(b):
                lb = model.lm_head.output
    longest = a.shape[1]
    assert la.shape == (1, longest, 100) and lb.shape == (1, longest, 100)
    torch.testing.assert_close(la[:, longest - a.shape[1] :], solo_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(lb[:, longest - b.shape[1] :], solo_b, atol=1e-5, rtol=0)


def test_hf_trace_batched_prompts_function_form(hf, hf_prompts):
    kind, net = hf
    a, b = hf_prompts
    model = mediator.Model(net)
    with torch.no_grad():
        solo_b = net(b).logits

    def last_logits() -> torch.Tensor:
        return model.lm_head.output[:, -1]

    with torch.no_grad():
        with model.trace() as tr:
            fa = tr.invoke(a).run(last_logits)
            fb = tr.invoke(b).run(last_logits)
    torch.testing.assert_close(fb.result(), solo_b[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(fa.result(), net(a).logits[:, -1].detach(), atol=1e-5, rtol=0)


def test_hf_model_output_is_narrowed_per_invoke(hf, hf_prompts):
    transformers = pytest.importorskip("transformers")
    kind, net = hf
    a, b = hf_prompts
    model = mediator.Model(net)
    with torch.no_grad():
        with model.trace() as tr:
            with tr.invoke(a):
                head_a = model.lm_head.output
                out_a = model.output
            with tr.invoke(b):
                out_b = tr.result
            with tr.invoke():
                whole = model.output
    for out in (out_a, out_b, whole, tr.result):
        assert isinstance(out, transformers.utils.ModelOutput)
    if kind == "llama":
        assert isinstance(out_a, transformers.modeling_outputs.CausalLMOutputWithPast)
    assert out_a.logits.shape == (1, a.shape[1], 100)
    assert out_b.logits.shape == (1, a.shape[1], 100)
    assert whole.logits.shape == (2, a.shape[1], 100)
    assert torch.equal(out_a.logits, head_a)
    assert torch.equal(out_a.logits, whole.logits[:1])
    assert torch.equal(out_b.logits, whole.logits[1:])
    assert torch.equal(tr.result.logits, whole.logits)
    with torch.no_grad():
        solo_b = net(b).logits
    torch.testing.assert_close(out_b.logits[:, -b.shape[1] :], solo_b, atol=1e-5, rtol=0)


def test_hf_batched_generation_equals_solo(hf, hf_prompts):
    kind, net = hf
    a, b = hf_prompts
    model = mediator.Model(net)
    solo_a = net.generate(a, **GREEDY)
    solo_b = net.generate(b, **GREEDY)
    with model.generate(**GREEDY) as tr:
        with tr.invoke(a):
            rows_a = tr.result
        fb = tr.invoke(b).run(lambda: tr.result)
    rows_b = fb.result()
    longest = a.shape[1]
    new = GREEDY["max_new_tokens"]
    assert rows_a.shape == rows_b.shape == (1, longest + new)
    assert torch.equal(rows_a[:, longest - a.shape[1] :], solo_a)
    assert torch.equal(rows_b[:, longest - b.shape[1] :], solo_b)


def test_hf_per_step_lm_head_reads_equal_hook(hf, hf_prompts):
    kind, net = hf
    ids = hf_prompts[0]
    model = mediator.Model(net)
    record: list[torch.Tensor] = []
    expected = hooked_generate(net, ids, {net.lm_head: collect(record)}, **GREEDY)
    new = GREEDY["max_new_tokens"]
    assert len(record) == new
    with model.generate(ids, **GREEDY) as tr:
        logits = [model.lm_head.output for _ in tr.iter[:]]
        after = torch.stack([step[0, -1] for step in logits])
    assert len(logits) == new
    for got, want in zip(logits, record, strict=True):
        assert got.shape == want.shape == (1, 1, 100)  # transformers 5 keeps only the last logits
        assert torch.equal(got, want)
    assert torch.equal(after.argmax(-1), expected[0, ids.shape[1] :])
    assert torch.equal(tr.result, expected)


def test_hf_steering_every_step_equals_hook(hf, hf_prompts):
    kind, net = hf
    ids = hf_prompts[1]
    model = mediator.Model(net)
    torch.manual_seed(24)
    vec = torch.randn(64) * 20.0
    block = net.transformer.h[0] if kind == "gpt2" else net.model.layers[0]

    def steer(call: int, o: Any) -> None:
        hidden_of(o)[:, -1] += vec

    plain = net.generate(ids, **GREEDY)
    expected = hooked_generate(net, ids, {block: steer}, **GREEDY)
    assert not torch.equal(plain, expected), "the steering vector must change the tokens"
    envoy = first_block(model, kind)
    with model.generate(ids, **GREEDY) as tr:
        for step in tr.iter[:]:
            hidden_of(envoy.output)[:, -1] += vec
    assert torch.equal(tr.result, expected)


def test_hf_steering_one_invoke_of_two(hf, hf_prompts):
    kind, net = hf
    a, b = hf_prompts
    model = mediator.Model(net)
    torch.manual_seed(24)
    vec = torch.randn(64) * 20.0
    block = net.transformer.h[0] if kind == "gpt2" else net.model.layers[0]

    def steer(call: int, o: Any) -> None:
        hidden_of(o)[:, -1] += vec

    solo_a = net.generate(a, **GREEDY)
    steered_b = hooked_generate(net, b, {block: steer}, **GREEDY)
    envoy = first_block(model, kind)

    def steer_body(tr: mediator.Tracer) -> torch.Tensor:
        for _ in tr.all():
            hidden_of(envoy.output)[:, -1] += vec
        return tr.result

    with model.generate(**GREEDY) as tr:
        fa = tr.invoke(a).run(lambda: tr.result)
        fb = tr.invoke(b).run(steer_body, tr)
    longest = a.shape[1]
    assert torch.equal(fa.result()[:, longest - a.shape[1] :], solo_a)
    assert torch.equal(fb.result()[:, longest - b.shape[1] :], steered_b)


def test_hf_generation_options_to_trace_are_usage_error(hf, hf_prompts):
    kind, net = hf
    ids = hf_prompts[0]
    model = mediator.Model(net)
    with pytest.raises(mediator.UsageError, match="generate"):
        model.trace(ids, max_new_tokens=3)
    with pytest.raises(mediator.UsageError, match="max_new_tokens"):
        with model.trace(max_new_tokens=3) as tr:
            with tr.invoke(ids):
                model.output
    with pytest.raises(mediator.UsageError):
        model.trace(ids, do_sample=False)


# -- more on steps during generation (TinyLM) -------------------------------------------------


def test_tiny_bounded_steps_and_stride(tiny, prompts):
    ids = prompts[0]
    model = mediator.Model(tiny)
    record: list[torch.Tensor] = []
    hooked_generate(tiny, ids, {tiny.lm_head: collect(record)}, max_new_tokens=NEW)
    with model.generate(ids, max_new_tokens=NEW) as tr:
        middle = [(s, model.lm_head.output) for s in tr.iter[1:3]]
    with model.generate(ids, max_new_tokens=NEW) as tr:
        strided = [(s, model.lm_head.output) for s in tr.iter[1::2]]
    assert [s for s, _ in middle] == [1, 2]
    assert [s for s, _ in strided] == [1, 3]
    for s, got in middle + strided:
        assert torch.equal(got, record[s])


def test_tiny_steps_listed_out_of_order_is_out_of_order_error(tiny, prompts):
    model = mediator.Model(tiny)
    with pytest.raises(mediator.OutOfOrderError) as info:
        with model.generate(prompts[1], max_new_tokens=NEW) as tr:
            for step in tr.iter[[3, 1]]:
                model.lm_head.output
    assert "lm_head" in str(info.value)


def test_tiny_cache_records_every_step(tiny, prompts):
    ids = prompts[1]
    model = mediator.Model(tiny)
    record: list[torch.Tensor] = []
    expected = hooked_generate(tiny, ids, {tiny.ln_f: collect(record)}, max_new_tokens=NEW)

    def body(tr: mediator.Tracer) -> Any:
        return tr.cache(modules=[model.ln_f])

    with model.generate(max_new_tokens=NEW) as tr:
        future = tr.invoke(ids).run(body, tr)
    cache = future.result()
    assert len(cache["ln_f"]) == NEW
    for got, want in zip(cache["ln_f"], record, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(tr.result, expected)


def test_tiny_stop_during_generation(tiny, prompts):
    ids = prompts[0]
    model = mediator.Model(tiny)
    record: list[torch.Tensor] = []
    hooked_generate(tiny, ids, {tiny.lm_head: collect(record)}, max_new_tokens=NEW)
    starts = [0]
    handle = tiny.lm_head.register_forward_pre_hook(
        lambda m, a: starts.__setitem__(0, starts[0] + 1)
    )
    try:
        with model.generate(ids, max_new_tokens=NEW) as tr:
            kept = []
            for step in tr.iter[:]:
                kept.append(model.lm_head.output)
                if step == 1:
                    tr.stop()
    finally:
        handle.remove()
    assert starts[0] == 2  # lm_head ran for steps 0 and 1 only
    assert len(kept) == 2
    for got, want in zip(kept, record[:2], strict=True):
        assert torch.equal(got, want)
    assert tr.result is None


def test_tiny_root_input_at_every_step(tiny, prompts):
    ids = prompts[1]
    model = mediator.Model(tiny)
    seen: list[torch.Tensor] = []
    handle = tiny.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        expected = tiny.generate(ids, max_new_tokens=NEW)
    finally:
        handle.remove()
    with model.generate(ids, max_new_tokens=NEW) as tr:
        fed = [model.input for _ in tr.iter[:]]
    assert len(fed) == NEW
    for got, want in zip(fed, seen, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(tr.result, expected)


def test_tiny_root_input_at_bounded_steps(tiny, prompts):
    ids = prompts[1]
    model = mediator.Model(tiny)
    seen: list[torch.Tensor] = []
    handle = tiny.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        tiny.generate(ids, max_new_tokens=NEW)
    finally:
        handle.remove()
    with model.generate(ids, max_new_tokens=NEW) as tr:
        fed = [model.input for _ in tr.iter[0:NEW]]
    assert len(fed) == NEW
    for k, (got, want) in enumerate(zip(fed, seen, strict=True)):
        assert got.shape == (1, ids.shape[1] + k)
        assert torch.equal(got, want)


def test_tiny_positional_mask_with_different_lengths_is_padded_like_a_keyword_one(tiny, prompts):
    """`tr.invoke(ids, mask)` is named by the forward's signature (input_ids, attention_mask)."""
    a, b = prompts
    model = mediator.Model(tiny)
    with model.trace() as tr:
        got_a = tr.invoke(a, torch.ones_like(a)).run(lambda: model.output)
        got_b = tr.invoke(b, torch.ones_like(b)).run(lambda: model.output)
    torch.testing.assert_close(got_a.result(), tiny(a))
    torch.testing.assert_close(got_b.result()[:, a.shape[1] - b.shape[1] :], tiny(b))
