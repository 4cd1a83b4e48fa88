"""Steps (`tr.iter[...]`, `tr.all()`) on modules called several times in one forward, and
`tr.result`, checked against plain PyTorch forward hooks that count calls.

A recurrent model calls its cell T times per forward; a weight-tied model calls one module twice.
Every step selection must pick exactly the calls a counting hook sees at those numbers, and
edits must land on exactly those calls (exact equality: the same batched forward runs).
"""

# ruff: noqa: B007, B018, F841

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_untouched
from torch import nn

import mediator

T = 4  # calls of the recurrent cell per forward
WIDTH = 6


class Cell(nn.Module):
    """h' = tanh(W h + x): called T times per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h) + x)


class Recurrent(nn.Module):
    def __init__(self, steps: int = T) -> None:
        super().__init__()
        self.steps = steps
        self.encode = nn.Linear(WIDTH, WIDTH)
        self.cell = Cell()
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encode(x)
        h = torch.zeros_like(x)
        for _ in range(self.steps):
            h = self.cell(h, x)
        return self.head(h)


class Tied(nn.Module):
    """`shared` is applied twice (weight tying): calls 0 and 1 of one module."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.shared = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.shared(self.embed(x)))
        h = self.shared(h)
        return self.head(torch.relu(h))


# -- oracles ---------------------------------------------------------------------------------


def per_call(
    net: nn.Module,
    module: nn.Module,
    *args: Any,
    edit: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[Any, list[torch.Tensor]]:
    """`net(*args)` with a forward hook on `module` that counts its calls, applies
    `edit(call, output)` (a replacement or None) and records each call's output after the edit.
    The hook is removed afterwards."""
    record: list[torch.Tensor] = []

    def hook(m: nn.Module, a: Any, o: torch.Tensor) -> torch.Tensor:
        call = len(record)
        if edit is not None:
            new = edit(call, o)
            if new is not None:
                o = new
        record.append(o)
        return o

    handle = module.register_forward_hook(hook)
    try:
        out = net(*args)
    finally:
        handle.remove()
    return out, record


@pytest.fixture
def rnet():
    torch.manual_seed(3)
    net = Recurrent()
    yield net
    assert_untouched(net)


@pytest.fixture
def tnet():
    torch.manual_seed(4)
    net = Tied()
    yield net
    assert_untouched(net)


@pytest.fixture
def xs():
    torch.manual_seed(5)
    return torch.randn(2, WIDTH), torch.randn(3, WIDTH)


# Selections and the calls (of a module called T=4 times) they must pick.
SELECTIONS = [
    (2, [2]),
    (0, [0]),
    (slice(1, 3), [1, 2]),
    (slice(1, None), [1, 2, 3]),
    (slice(None), [0, 1, 2, 3]),
    (slice(0, 4, 2), [0, 2]),
    (slice(1, None, 2), [1, 3]),
    ([0, 3], [0, 3]),
    ((1, 2), [1, 2]),
    ("all", [0, 1, 2, 3]),
]


def _ids(selection: Any) -> str:
    return repr(selection)


# -- which calls a selection targets ---------------------------------------------------------


@pytest.mark.parametrize("selection,calls", SELECTIONS, ids=[_ids(s) for s, _ in SELECTIONS])
def test_iter_selects_calls_of_recurrent_cell_with_body(rnet, xs, selection, calls):
    x = xs[1]
    model = mediator.Model(rnet)
    expected_out, record = per_call(rnet, rnet.cell, x)
    assert len(record) == T
    with model.trace(x) as tr:
        got = []
        steps = tr.all() if selection == "all" else tr.iter[selection]
        for step in steps:
            got.append((step, model.cell.output))
        out = tr.result  # after an open loop the forward has returned: no module read here
    assert [step for step, _ in got] == calls
    for step, value in got:
        assert torch.equal(value, record[step])
    assert torch.equal(out, expected_out)


@pytest.mark.parametrize("selection,calls", SELECTIONS, ids=[_ids(s) for s, _ in SELECTIONS])
def test_iter_selects_calls_of_recurrent_cell_function(rnet, xs, selection, calls):
    x = xs[1]
    model = mediator.Model(rnet)
    _, record = per_call(rnet, rnet.cell, x)

    def read(tr: mediator.Tracer, selection: Any) -> list[tuple[int, torch.Tensor]]:
        steps = tr.all() if selection == "all" else tr.iter[selection]
        return [(step, model.cell.output) for step in steps]

    with model.trace() as tr:
        future = tr.invoke(x).run(read, tr, selection)
    got = future.result()
    assert [step for step, _ in got] == calls
    for step, value in got:
        assert torch.equal(value, record[step])


def test_iter_reaches_nested_module_calls(rnet, xs):
    """The cell's own submodule is called T times as well: steps number its calls too."""
    x = xs[0]
    model = mediator.Model(rnet)
    _, record = per_call(rnet, rnet.cell.lin, x)
    with model.trace(x) as tr:
        lins = [model.cell.lin.output for _ in tr.iter[:]]
    assert len(lins) == T
    for value, expected in zip(lins, record, strict=True):
        assert torch.equal(value, expected)


TIED_SELECTIONS = [
    (0, [0]),
    (1, [1]),
    (slice(0, 2), [0, 1]),
    (slice(1, None), [1]),
    (slice(None), [0, 1]),
    ([0, 1], [0, 1]),
    ("all", [0, 1]),
]


@pytest.mark.parametrize(
    "selection,calls", TIED_SELECTIONS, ids=[_ids(s) for s, _ in TIED_SELECTIONS]
)
def test_iter_selects_calls_of_weight_tied_module(tnet, xs, selection, calls):
    x = xs[1]
    model = mediator.Model(tnet)
    expected_out, record = per_call(tnet, tnet.shared, x)
    assert len(record) == 2
    with model.trace(x) as tr:
        got = []
        steps = tr.all() if selection == "all" else tr.iter[selection]
        for step in steps:
            got.append((step, model.shared.output))
        out = tr.result
    assert [step for step, _ in got] == calls
    for step, seen_output in got:
        assert torch.equal(seen_output, record[step])
    assert torch.equal(out, expected_out)


def shared_inputs(net: Tied, x: torch.Tensor) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    handle = net.shared.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    try:
        net(x)
    finally:
        handle.remove()
    return inputs


def test_bounded_steps_read_inputs_of_each_call(tnet, xs):
    x = xs[1]
    model = mediator.Model(tnet)
    inputs = shared_inputs(tnet, x)
    _, record = per_call(tnet, tnet.shared, x)
    with model.trace(x) as tr:
        got = [(model.shared.input, model.shared.output) for _ in tr.iter[0:2]]
    assert len(got) == 2
    for (seen_input, seen_output), expected_in, expected_out in zip(
        got, inputs, record, strict=True
    ):
        assert torch.equal(seen_input, expected_in)
        assert torch.equal(seen_output, expected_out)


def test_open_loop_reads_inputs_of_each_call(tnet, xs):
    x = xs[1]
    model = mediator.Model(tnet)
    inputs = shared_inputs(tnet, x)
    with model.trace(x) as tr:
        got = [model.shared.input for _ in tr.iter[:]]
    assert len(got) == 2
    for seen_input, expected_in in zip(got, inputs, strict=True):
        assert torch.equal(seen_input, expected_in)


def test_open_loop_edits_inputs_of_each_call(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)
    record: list[torch.Tensor] = []

    def pre(m: nn.Module, a: tuple[Any, ...]) -> tuple[Any, ...]:
        record.append(a[0])
        return (a[0] * 0.5, a[1])

    handle = rnet.cell.register_forward_pre_hook(pre)
    try:
        expected = rnet(x)
    finally:
        handle.remove()
    with model.trace(x) as tr:
        for step in tr.iter[:]:
            model.cell.input = model.cell.input * 0.5
    assert torch.equal(tr.result, expected)


def test_without_iter_a_request_targets_call_zero(tnet, xs):
    x = xs[0]
    model = mediator.Model(tnet)
    _, record = per_call(tnet, tnet.shared, x)
    with model.trace(x):
        first = model.shared.output
    assert torch.equal(first, record[0])


# -- open loops ------------------------------------------------------------------------------


def test_open_loop_ends_when_forward_returns_and_code_after_runs(rnet, xs):
    x = xs[1]
    model = mediator.Model(rnet)
    expected_out, record = per_call(rnet, rnet.cell, x)
    with model.trace(x) as tr:
        outs = []
        for step in tr.iter[:]:
            outs.append(model.cell.output)
        after = len(outs)  # bound after the loop
        stacked = torch.stack(outs)
        final = tr.result
    assert after == T
    assert torch.equal(stacked, torch.stack(record))
    assert torch.equal(final, expected_out)


def test_open_loop_function_form_returns_after_loop(rnet, xs):
    x = xs[1]
    model = mediator.Model(rnet)
    expected_out, record = per_call(rnet, rnet.cell, x)

    def body(tr: mediator.Tracer) -> tuple[list[torch.Tensor], str, torch.Tensor]:
        outs = [model.cell.output for _ in tr.all()]
        return outs, "after the loop", tr.result

    with model.trace() as tr:
        future = tr.invoke(x).run(body, tr)
    outs, marker, final = future.result()
    assert marker == "after the loop"
    assert len(outs) == T
    for value, expected in zip(outs, record, strict=True):
        assert torch.equal(value, expected)
    assert torch.equal(final, expected_out)


def test_open_loop_starting_late_on_weight_tied_module(tnet, xs):
    x = xs[0]
    model = mediator.Model(tnet)
    _, record = per_call(tnet, tnet.shared, x)
    with model.trace(x) as tr:
        seen = [(step, model.shared.output) for step in tr.iter[1:]]
        done = True
    assert done is True
    assert [s for s, _ in seen] == [1]
    assert torch.equal(seen[0][1], record[1])


def test_read_after_open_loop_targets_step_zero_again(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)
    with pytest.raises(mediator.OutOfOrderError) as info:
        with model.trace(x) as tr:
            for step in tr.iter[:]:
                model.cell.output
            late = model.cell.output
    message = str(info.value)
    assert "cell" in message
    assert re.search(r"\b0\b", message)


def test_read_after_open_loop_function_form(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)

    def body(tr: mediator.Tracer) -> None:
        for _ in tr.iter[:]:
            model.cell.output
        model.cell.output

    with pytest.raises(mediator.OutOfOrderError) as info:  # raised from the with, like a body
        with model.trace() as tr:
            future = tr.invoke(x).run(body, tr)
    assert "cell" in str(info.value)
    with pytest.raises(mediator.OutOfOrderError):
        future.result()


# -- steps the model never reached -----------------------------------------------------------


def test_bounded_step_never_reached_names_module_and_step(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)
    with pytest.raises(mediator.MissedProviderError) as info:
        with model.trace(x) as tr:
            for step in tr.iter[[1, 6]]:
                model.cell.output
    message = str(info.value)
    assert "cell" in message
    assert re.search(r"\b6\b", message)


def test_bounded_slice_past_the_end_function_form(tnet, xs):
    x = xs[0]
    model = mediator.Model(tnet)
    got: list[int] = []

    def body(tr: mediator.Tracer) -> None:
        for step in tr.iter[0:3]:
            model.shared.output
            got.append(step)

    with pytest.raises(mediator.MissedProviderError) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(body, tr)
    assert got == [0, 1]
    message = str(info.value)
    assert "shared" in message
    assert re.search(r"\b2\b", message)


def test_swap_at_unreached_step_is_missed_provider(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)
    with pytest.raises(mediator.MissedProviderError) as info:
        with model.trace(x) as tr:
            for step in tr.iter[[T + 1]]:
                model.cell.output = torch.zeros(2, WIDTH)
    message = str(info.value)
    assert "cell" in message
    assert re.search(rf"\b{T + 1}\b", message)


def test_negative_step_is_value_error(rnet, xs):
    model = mediator.Model(rnet)
    with pytest.raises(ValueError):
        with model.trace(xs[0]) as tr:
            for step in tr.iter[-1]:
                model.cell.output
    with pytest.raises(ValueError):
        with model.trace(xs[0]) as tr:
            for step in tr.iter[-2:]:
                model.cell.output
    for zero_stride in (slice(0, 3, 0), slice(1, None, 0)):
        with pytest.raises(ValueError, match="steps count up"):
            with model.trace(xs[0]) as tr:
                for step in tr.iter[zero_stride]:
                    model.cell.output


def test_iter_outside_a_body_is_usage_error(rnet, xs):
    model = mediator.Model(rnet)
    with pytest.raises(mediator.UsageError):
        with model.trace() as tr:
            tr.iter[0]
            with tr.invoke(xs[0]):
                model.output
    with pytest.raises(mediator.UsageError):
        with model.trace() as tr:
            tr.all()
            with tr.invoke(xs[0]):
                model.output


# -- edits on chosen steps -------------------------------------------------------------------


def test_swap_on_chosen_steps_only(rnet, xs):
    x = xs[1]
    model = mediator.Model(rnet)
    chosen = {1, 3}
    expected_out, record = per_call(
        rnet, rnet.cell, x, edit=lambda call, o: o * -2.0 if call in chosen else None
    )
    plain_out, _ = per_call(rnet, rnet.cell, x)
    assert not torch.allclose(expected_out, plain_out)
    with model.trace(x) as tr:
        for step in tr.iter[[1, 3]]:
            model.cell.output = model.cell.output * -2.0
        cells = [model.cell.output for _ in tr.iter[4:4]]  # empty selection: no request
        out = model.output
    assert cells == []
    assert torch.equal(out, expected_out)


def test_in_place_edit_on_a_slice_of_steps(rnet, xs):
    x = xs[1]
    model = mediator.Model(rnet)

    def edit(call: int, o: torch.Tensor) -> None:
        if 1 <= call < 3:
            o[:, 0] = 5.0

    with torch.no_grad():
        expected_out, record = per_call(rnet, rnet.cell, x, edit=edit)
        with model.trace(x) as tr:
            seen = []
            for step in tr.all():
                if step in (1, 2):
                    model.cell.output[:, 0] = 5.0
                seen.append(model.cell.output)
            out = tr.result
    assert torch.equal(out, expected_out)
    assert len(seen) == T
    for value, expected in zip(seen, record, strict=True):
        assert torch.equal(value, expected)


def test_edit_second_call_of_weight_tied_module_function_form(tnet, xs):
    x = xs[1]
    model = mediator.Model(tnet)
    expected_out, _ = per_call(
        tnet, tnet.shared, x, edit=lambda call, o: torch.zeros_like(o) if call == 1 else None
    )

    def body(tr: mediator.Tracer) -> torch.Tensor:
        for _ in tr.iter[1]:
            model.shared.output = torch.zeros_like(model.shared.output)
        return model.output

    with model.trace() as tr:
        future = tr.invoke(x).run(body, tr)
    assert torch.equal(future.result(), expected_out)
    # the first call was left alone: a hand-written forward with only call 1 zeroed
    with torch.no_grad():
        h = torch.relu(tnet.shared(tnet.embed(x)))
        assert torch.allclose(future.result(), tnet.head(torch.relu(torch.zeros_like(h))))


def test_batched_invokes_edit_and_read_chosen_steps(rnet, xs):
    """Invoke 0 (2 rows) edits calls 0 and 2; invoke 1 (3 rows) reads every call. The oracle
    is one batched forward whose hook edits rows 0:2 on calls 0 and 2."""
    x1, x2 = xs
    model = mediator.Model(rnet)
    rows = slice(0, 2)

    def edit(call: int, o: torch.Tensor) -> torch.Tensor | None:
        if call not in (0, 2):
            return None
        new = o.clone()
        new[rows] = o[rows] + 1.0
        return new

    expected_out, record = per_call(rnet, rnet.cell, torch.cat([x1, x2]), edit=edit)
    with model.trace() as tr:
        with tr.invoke(x1):
            for step in tr.iter[0:3:2]:
                model.cell.output = model.cell.output + 1.0
            out1 = model.output
        with tr.invoke(x2):
            read2 = [model.cell.output for step in tr.iter[:]]
            out2 = tr.result
    assert torch.equal(out1, expected_out[rows])
    assert torch.equal(out2, expected_out[2:])
    assert len(read2) == T
    for value, expected in zip(read2, record, strict=True):
        assert torch.equal(value, expected[2:])


def test_batched_invokes_function_form_different_steps(tnet, xs):
    x1, x2 = xs
    model = mediator.Model(tnet)
    batch = torch.cat([x1, x2])

    def edit(call: int, o: torch.Tensor) -> torch.Tensor | None:
        new = o.clone()
        if call == 0:
            new[2:] = 0.0  # invoke 1 zeroes call 0
        else:
            new[:2] = new[:2] * 3.0  # invoke 0 scales call 1
        return new

    expected_out, record = per_call(tnet, tnet.shared, batch, edit=edit)

    def scale_second(tr: mediator.Tracer) -> torch.Tensor:
        for _ in tr.iter[[1]]:
            model.shared.output = model.shared.output * 3.0
        return tr.result

    def zero_first(tr: mediator.Tracer) -> list[torch.Tensor]:
        model.shared.output = torch.zeros_like(model.shared.output)
        return [model.shared.output for _ in tr.iter[1:]]

    with model.trace() as tr:
        a = tr.invoke(x1).run(scale_second, tr)
        b = tr.invoke(x2).run(zero_first, tr)
    assert torch.equal(a.result(), expected_out[:2])
    seen = b.result()
    assert len(seen) == 1
    assert torch.equal(seen[0], record[1][2:])
    assert torch.equal(tr.result, expected_out)


# -- tr.result -------------------------------------------------------------------------------


def test_result_after_trace_equals_return_value(rnet, xs):
    x = xs[1]
    model = mediator.Model(rnet)
    expected = rnet(x)
    with model.trace(x) as tr:
        model.cell.output
    assert torch.equal(tr.result, expected)


def test_result_inside_bodies_is_each_invokes_rows(rnet, xs):
    x1, x2 = xs
    model = mediator.Model(rnet)
    full = rnet(torch.cat([x1, x2, x2]))
    with model.trace() as tr:
        with tr.invoke(x1):
            mid = model.cell.output
            r1 = tr.result  # waits until the forward returned
        with tr.invoke(x2):
            r2 = tr.result
        f = tr.invoke(x2).run(lambda: tr.result)
    assert r1.shape[0] == 2 and r2.shape[0] == 3
    assert torch.equal(r1, full[:2])
    assert torch.equal(r2, full[2:5])
    assert torch.equal(f.result(), full[5:])
    assert torch.equal(tr.result, full)
    assert torch.allclose(r1, rnet(x1), atol=1e-6)


def test_result_inside_body_reflects_edits(rnet, xs):
    x = xs[0]
    model = mediator.Model(rnet)
    expected, _ = per_call(rnet, rnet.cell, x, edit=lambda call, o: o * 0 if call == 2 else None)
    with model.trace(x) as tr:
        for _ in tr.iter[2]:
            model.cell.output = model.cell.output * 0
        inside = tr.result
    assert torch.equal(inside, expected)
    assert torch.equal(tr.result, expected)


def test_result_before_trace_ran_is_usage_error(rnet, xs):
    model = mediator.Model(rnet)
    tr = model.trace()
    with pytest.raises(mediator.UsageError):
        tr.result
    with model.trace() as tr2:
        with pytest.raises(mediator.UsageError):
            tr2.result
        with tr2.invoke(xs[0]):
            model.output
    assert torch.equal(tr2.result, rnet(xs[0]))
