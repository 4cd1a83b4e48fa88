"""Names across invokes follow top-to-bottom order (issue 11, case 1).

A body reading a name it has not bound itself yet gets the nearest earlier invoke's binding
(waiting for it; passing over an earlier invoke that ended without binding it), else the value
from before the trace; later invokes never reach earlier ones; once a body has bound the name
it reads its own binding. Each oracle is the same program run as separate solo traces in
definition order, the names passing between them as plain Python passes them (tight
tolerance: a different batch size may change the last bits of a matmul).
"""

# Bodies bind names to show they are bound (F841).
# ruff: noqa: F841

from __future__ import annotations

import runpy

import pytest
import torch


def randn(seed: int, *shape: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_patching_then_rebinding_the_same_name(model):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)

    def batched():
        h = torch.full((2, 8), 100.0)  # stale: the trace must not hand this to invoke 2
        with model.trace() as tr:
            with tr.invoke(clean):
                h = model.layers[0].output
                h_clean = h
            with tr.invoke(corrupt):
                model.layers[0].output[:, 7] = h[:, 7]
                h = model.layers[1].output
                twice = h * 2  # its own binding now
                out = model.output
        return h_clean, h, twice, out

    def solo():
        h = torch.full((2, 8), 100.0)
        with model.trace(clean):
            h = model.layers[0].output
            h_clean = h
        with model.trace(corrupt):
            model.layers[0].output[:, 7] = h[:, 7]
            h = model.layers[1].output
            twice = h * 2
            out = model.output
        return h_clean, h, twice, out

    expected = solo()
    assert not close(expected[3], model(corrupt))  # the patch changes the output
    for _ in range(2):  # the second run finds every name bound from the first
        for got, want in zip(batched(), expected, strict=True):
            assert close(got, want)


def test_patching_into_a_name_unbound_before_the_trace(model):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)

    def batched():
        with model.trace() as tr:
            with tr.invoke(clean):
                h = model.layers[0].output
            with tr.invoke(corrupt):
                model.layers[0].output[:, 7] = h[:, 7]
                h = model.layers[1].output
                out = model.output
        return h, out

    def solo():
        with model.trace(clean):
            h = model.layers[0].output
        with model.trace(corrupt):
            model.layers[0].output[:, 7] = h[:, 7]
            h = model.layers[1].output
            out = model.output
        return h, out

    for got, want in zip(batched(), solo(), strict=True):
        assert close(got, want)


def test_a_later_invoke_does_not_reach_an_earlier_one(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)

    def batched():
        scale = 1.0
        with model.trace() as tr:
            with tr.invoke(a):
                model.layers[1].output = model.layers[1].output * scale
                oa = model.output
            with tr.invoke(b):
                scale = 0.0
                model.layers[1].output = model.layers[1].output * scale
                ob = model.output
        return oa, ob, scale

    def solo():
        scale = 1.0
        with model.trace(a):
            model.layers[1].output = model.layers[1].output * scale
            oa = model.output
        with model.trace(b):
            scale = 0.0
            model.layers[1].output = model.layers[1].output * scale
            ob = model.output
        return oa, ob, scale

    (oa, ob, scale), (ea, eb, escale) = batched(), solo()
    assert close(oa, ea) and close(ob, eb)
    assert scale == escale == 0.0  # the caller holds the last invoke's binding
    assert close(oa, model(a))


def test_binding_a_cached_object_counts_as_bound(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    results = []
    for _ in range(2):  # the second run starts with k bound to the same small int
        with model.trace() as tr:
            with tr.invoke(a):
                k = 2
                oa = model.output
            with tr.invoke(b):
                model.layers[1].output = model.layers[1].output * k
                ob = model.output
        results.append((oa, ob, k))
    with model.trace(a):
        k = 2
        ea = model.output
    with model.trace(b):
        model.layers[1].output = model.layers[1].output * k
        eb = model.output
    for oa, ob, k in results:
        assert close(oa, ea) and close(ob, eb) and k == 2


def test_nearest_earlier_binding_wins(model):
    a, b, c = randn(1, 2, 8), randn(2, 2, 8), randn(3, 2, 8)

    def batched():
        with model.trace() as tr:
            with tr.invoke(a):
                h = model.layers[0].output
            with tr.invoke(b):
                h = model.layers[1].output
            with tr.invoke(c):
                model.layers[2].output = model.layers[2].output + h
                out = model.output
        return h, out

    def solo():
        with model.trace(a):
            h = model.layers[0].output
        with model.trace(b):
            h = model.layers[1].output
        with model.trace(c):
            model.layers[2].output = model.layers[2].output + h
            out = model.output
        return h, out

    for got, want in zip(batched(), solo(), strict=True):
        assert close(got, want)


def test_an_earlier_invoke_that_binds_nothing_is_passed_over(model):
    a, b, c = randn(1, 2, 8), randn(2, 2, 8), randn(3, 2, 8)

    def batched(h):
        with model.trace() as tr:
            with tr.invoke(a):
                h = model.layers[0].output
            with tr.invoke(b):
                seen = model.layers[1].output
                if seen.sum() > 1e9:  # never: b ends without binding h
                    h = seen
            with tr.invoke(c):
                model.layers[2].output = model.layers[2].output + h
                out = model.output
        return h, out

    def solo(h):
        with model.trace(a):
            h = model.layers[0].output
        with model.trace(b):
            seen = model.layers[1].output
            if seen.sum() > 1e9:
                h = seen
        with model.trace(c):
            model.layers[2].output = model.layers[2].output + h
            out = model.output
        return h, out

    stale = torch.full((2, 8), 100.0)
    for got, want in zip(batched(stale), solo(stale), strict=True):
        assert close(got, want)


def test_no_earlier_binding_reads_the_value_from_before_the_trace(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)

    def batched(h):
        with model.trace() as tr:
            with tr.invoke(a):
                seen = model.layers[1].output
                if seen.sum() > 1e9:  # never
                    h = seen
            with tr.invoke(b):
                model.layers[2].output = model.layers[2].output + h
                h = model.output
        return h

    def solo(h):
        with model.trace(a):
            seen = model.layers[1].output
            if seen.sum() > 1e9:
                h = seen
        with model.trace(b):
            model.layers[2].output = model.layers[2].output + h
            h = model.output
        return h

    before = torch.full((2, 8), 3.0)
    assert close(batched(before), solo(before))


def test_nested_scopes_and_augmented_assignment(model):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)

    def batched():
        with model.trace() as tr:
            with tr.invoke(clean):
                h = model.layers[0].output
            with tr.invoke(corrupt):
                rows = [h[i] for i in range(2)]  # the earlier invoke's h, in a comprehension
                add = lambda t: t + h  # noqa: E731 - called before and after h is rebound
                early = add(1.0)

                def nested():
                    return h * 3

                class Holder:
                    value = h

                first = nested()
                h = model.layers[1].output
                h += 1.0
                late = add(1.0)
                again = nested()
                own = [h[i] for i in range(2)]
                out = model.output
        return torch.stack(rows), early, first, Holder.value, h, late, again, torch.stack(own)

    def solo():
        with model.trace(clean):
            h = model.layers[0].output
        with model.trace(corrupt):
            rows = [h[i] for i in range(2)]
            add = lambda t: t + h  # noqa: E731
            early = add(1.0)

            def nested():
                return h * 3

            class Holder:
                value = h

            first = nested()
            h = model.layers[1].output
            h += 1.0
            late = add(1.0)
            again = nested()
            own = [h[i] for i in range(2)]
        return torch.stack(rows), early, first, Holder.value, h, late, again, torch.stack(own)

    for got, want in zip(batched(), solo(), strict=True):
        assert close(got, want)


def test_function_invoke_reading_a_with_body_name_says_why(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)

    def fn():
        model.layers[1].output = model.layers[1].output + h
        return model.output

    with pytest.raises(NameError, match="only when the trace ends") as info:
        with model.trace() as tr:
            with tr.invoke(a):
                h = model.layers[0].output
            future = tr.invoke(b).run(fn)
    assert "argument" in str(info.value)
    assert future.exception() is info.value
    assert info.value.name == "h"


MODULE_SCRIPT = """
import torch
from torch import nn

import mediator

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
model = mediator.Model(net)
clean, corrupt = torch.randn(2, 4), torch.randn(2, 4)
h = torch.full((2, 4), 100.0)  # stale

with model.trace() as tr:
    with tr.invoke(clean):
        h = model[0].output
    with tr.invoke(corrupt):
        model[0].output[:, 1] = h[:, 1]
        h = model[2].output
        patched = model.output
batched = (h, patched)

h = torch.full((2, 4), 100.0)
with model.trace(clean):
    h = model[0].output
with model.trace(corrupt):
    model[0].output[:, 1] = h[:, 1]
    h = model[2].output
    patched = model.output
solo = (h, patched)
"""


def test_names_across_invokes_at_module_level(tmp_path):
    script = tmp_path / "module_level_names.py"
    script.write_text(MODULE_SCRIPT)
    names = runpy.run_path(str(script))
    for got, want in zip(names["batched"], names["solo"], strict=True):
        assert close(got, want)


def test_an_augmented_assignment_across_invokes_accumulates(model, x) -> None:
    """`total += ...` in one invoke per input adds up over the invokes, as the same lines run
    one after another do (oracle: the sum of each input's own output)."""
    inputs = [x[i : i + 1] for i in range(3)]
    total = 0.0
    with torch.no_grad(), model.trace() as tr:
        for part in inputs:
            with tr.invoke(part):
                total += model.output.sum().item()
    with torch.no_grad():
        expected = sum(model._module(part).sum().item() for part in inputs)
    assert total == pytest.approx(expected, rel=1e-5)
