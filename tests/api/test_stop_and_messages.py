"""`tr.stop()` cutting other bodies short (`StoppedWarning`), and the messages of three frictions:
a read after an open `tr.iter[:]` loop, an `OutOfOrderError` caused by waiting for another
invoke's name, and where a late in-place edit was made (`LateEditWarning`).

Values are compared with plain PyTorch (forward hooks recording what each layer computed and
how often it ran); warnings and errors with the exact text and line they must carry.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mediator

HERE = __file__


def line_of(marker: str) -> int:
    """The line of this file whose comment ends with `marker`."""
    with open(HERE) as source:
        lines = source.read().splitlines()
    hits = [n for n, text in enumerate(lines, 1) if "#" in text and text.endswith(f" {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def plain(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """The oracle: each layer's output for `x` alone, and how often each layer ran."""
    outputs: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outputs.append(o)) for layer in net.layers
    ]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs, [1] * len(outputs)


def counting(net: nn.Module) -> tuple[list[int], Callable[[], None]]:
    """How often each layer runs from now on, and the function that stops counting."""
    counts = [0] * len(net.layers)
    handles = [
        layer.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(net.layers)
    ]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return counts, remove


def caught(run: Callable[[], None]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return [
        w
        for w in seen
        if issubclass(w.category, (mediator.StoppedWarning, mediator.LateEditWarning))
    ]


def cut_text(invoke: str, what: str, stopper: int) -> str:
    return (
        f"{invoke} was cut short at {what}: tr.stop() in invoke {stopper} ended the forward pass "
        "first, so the rest of that body did not run and the names it would have bound from "
        "there on keep their earlier values. If that body needs what comes later, call "
        "tr.stop() after it"
    )


@pytest.fixture
def x2() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(2, 8)


# -- case 6: tr.stop() while another invoke still waits ---------------------------------------


def test_a_body_waiting_for_a_later_value_is_cut_with_a_warning(net, model, x, x2) -> None:
    want1, _ = plain(net, x)
    want2, _ = plain(net, x2)
    counts, remove = counting(net)
    got: dict[str, Any] = {}
    late = "before the trace"
    after = "before the trace"

    def run() -> None:
        nonlocal late, after
        try:
            with torch.no_grad(), model.trace() as tr:
                with tr.invoke(x):
                    first = model.layers[0].output  # first line of invoke 0
                    late = model.layers[3].output  # cut here
                    after = "ran"
                with tr.invoke(x2):
                    got["early"] = model.layers[1].output
                    tr.stop()
                    got["after stop"] = "ran"
            got["first"] = first
        finally:
            remove()

    seen = caught(run)
    assert counts == [1, 1, 0, 0]  # the forward ended right after layers.1
    torch.testing.assert_close(got["first"], want1[0])  # bound before the cut: kept
    torch.testing.assert_close(got["early"], want2[1])
    assert late == "before the trace" and after == "before the trace"  # earlier values
    assert "after stop" not in got  # tr.stop() acts like return
    assert len(seen) == 1  # the stopping body itself gets none
    warning = seen[0]
    assert warning.category is mediator.StoppedWarning
    assert (warning.filename, warning.lineno) == (HERE, line_of("cut here"))
    invoke = f"invoke 0 (its with-body at {HERE}:{line_of('first line of invoke 0')})"
    assert str(warning.message) == cut_text(invoke, "layers.3.output (call 0)", 1)


def test_bodies_due_at_the_point_of_the_stop_are_still_served(net, model, x, x2) -> None:
    """The forward ends right after the current point: a later invoke waiting for the same
    boundary still gets its value, and is not warned about."""
    want2, _ = plain(net, x2)
    counts, remove = counting(net)
    got: dict[str, Any] = {}

    def run() -> None:
        try:
            with torch.no_grad(), model.trace() as tr:
                with tr.invoke(x):
                    model.layers[1].output  # noqa: B018
                    tr.stop()
                with tr.invoke(x2):
                    got["same point"] = model.layers[1].output
        finally:
            remove()

    assert caught(run) == []
    assert counts == [1, 1, 0, 0]
    torch.testing.assert_close(got["same point"], want2[1])


def test_cut_with_bodies_a_name_wait_and_a_function_are_reported_in_order(
    net, model, x, x2
) -> None:
    """Invoke 1 waits for a name that invoke 0 would bind after a later value: both are cut, and
    so is a function invoke; each warning names its invoke and request, at the request's line."""
    want1, _ = plain(net, x)
    got: dict[str, Any] = {}
    shared = value = "before the trace"

    def reader() -> torch.Tensor:
        got["h0"] = model.layers[0].output
        return model.layers[3].output  # cut in the function

    def run() -> None:
        nonlocal shared, value
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(x):
                h0 = model.layers[0].output  # first line of the with-body
                shared = model.layers[3].output  # cut at layers.3
            with tr.invoke(x2):
                value = shared  # cut at the name
            got["future"] = tr.invoke(x).run(reader)
            with tr.invoke(x2):
                model.layers[1].output  # noqa: B018
                tr.stop()
        got["h0 with"] = h0

    seen = caught(run)
    torch.testing.assert_close(got["h0"], want1[0])
    torch.testing.assert_close(got["h0 with"], want1[0])
    assert shared == "before the trace" and value == "before the trace"
    with_invoke = f"invoke 0 (its with-body at {HERE}:{line_of('first line of the with-body')})"
    name_invoke = f"invoke 1 (its with-body at {HERE}:{line_of('cut at the name')})"
    function_text = cut_text(f"invoke 2 ({reader.__qualname__})", "layers.3.output (call 0)", 3)
    assert [(w.category, w.filename, w.lineno, str(w.message)) for w in seen] == [
        (
            mediator.StoppedWarning,
            HERE,
            line_of("cut at layers.3"),
            cut_text(with_invoke, "layers.3.output (call 0)", 3),
        ),
        (
            mediator.StoppedWarning,
            HERE,
            line_of("cut at the name"),
            cut_text(name_invoke, "the name 'shared' (bound by another invoke)", 3),
        ),
        (mediator.StoppedWarning, HERE, line_of("cut in the function"), function_text),
    ]
    with pytest.raises(mediator.MissedProviderError) as error:
        got["future"].result()
    assert str(error.value) == function_text


def test_bodies_cut_by_a_failure_get_no_warning(net, model, x, x2) -> None:
    def run() -> None:
        with pytest.raises(KeyError, match="invoke 1"):
            with model.trace() as tr:
                with tr.invoke(x):
                    model.layers[3].output  # noqa: B018
                with tr.invoke(x2):
                    model.layers[1].output  # noqa: B018
                    tr.stop()
                with tr.invoke(x2):
                    model.layers[1].output  # noqa: B018
                    raise KeyError("invoke 1")

    assert caught(run) == []


# -- case 7a: a read after an open loop --------------------------------------------------------


def test_a_read_after_an_open_loop_says_the_call_has_returned(net, model, x) -> None:
    want, _ = plain(net, x)
    kept: list[torch.Tensor] = []
    with pytest.raises(mediator.OutOfOrderError) as error:
        with torch.no_grad(), model.trace(x) as tr:
            for _step in tr.iter[:]:
                kept.append(model.layers[0].output)
            model.layers[0].output  # noqa: B018 - after the loop
    assert str(error.value) == (
        "layers.0.output (call 0) was requested after an open `tr.iter[a:]` loop of this body "
        "ended: such a loop ends only when the traced call has returned, so the model computes "
        "nothing more. Read the value inside the loop, use tr.result for the call's return "
        "value, or loop over a bounded range (tr.iter[0:n]), after which the model still runs"
    )
    assert traceback.extract_tb(error.value.__traceback__)[-1].lineno == line_of("after the loop")
    assert len(kept) == 1
    torch.testing.assert_close(kept[0], want[0])


# -- case 7b: an OutOfOrderError caused by waiting for a name ----------------------------------


def test_out_of_order_after_a_name_wait_names_the_name_and_its_invoke(model, x, x2) -> None:
    with pytest.raises(mediator.OutOfOrderError) as error:
        with model.trace() as tr:
            with tr.invoke(x):
                clean = model.layers[3].output
            with tr.invoke(x2):
                use = clean
                model.layers[1].output = use  # waited for clean
    assert str(error.value) == (
        "layers.1.output (call 0) was requested after the model had already computed it (it is "
        "now at layers.3.output (call 0)). This body waited for the name 'clean', which invoke 0 "
        "binds, and the model ran on meanwhile: request layers.1.output (call 0) before the line "
        "that uses 'clean'. Request values in the order the model computes them; to use a value "
        "in a later invoke, read it in an earlier one"
    )
    assert traceback.extract_tb(error.value.__traceback__)[-1].lineno == line_of("waited for clean")


def test_no_name_hint_when_the_value_was_passed_before_the_wait(model, x, x2) -> None:
    with pytest.raises(mediator.OutOfOrderError) as error:
        with model.trace() as tr:
            with tr.invoke(x):
                clean = model.layers[3].output
            with tr.invoke(x2):
                model.layers[2].output  # noqa: B018
                use = clean
                model.layers[1].output = use
    assert "waited for the name" not in str(error.value)
    assert str(error.value).startswith("layers.1.output (call 0) was requested after the model")


# -- case 7c: where a late edit was made -------------------------------------------------------


def test_a_late_edit_names_the_lines_it_lies_between(net, model, x) -> None:
    got: dict[str, Any] = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            h = model.layers[0].output
            model.layers[1].output  # noqa: B018 - the model moved on
            unrelated = 1  # noqa: F841
            h[:] = 0
            got["out"] = model.output  # the next request

    seen = caught(run)
    assert [(w.category, w.filename, w.lineno) for w in seen] == [
        (mediator.LateEditWarning, HERE, line_of("the next request"))
    ]
    assert str(seen[0].message) == (
        "layers.0.output (call 0) was changed in place after the model had already used it "
        f"(edited between {HERE}:{line_of('the model moved on')}, where the model moved on, and "
        f"{HERE}:{line_of('the next request')}), so the change has no effect on this forward "
        "pass. Edit a value right after reading it, before asking for anything the model "
        "computes later (or waiting for another invoke's name); .clone() a value you want to "
        "change for your own use"
    )
    with torch.no_grad():
        torch.testing.assert_close(got["out"], net(x))  # the edit changed nothing


def test_a_late_edit_after_the_last_request_names_where_the_model_moved_on(net, model, x) -> None:
    def run() -> None:
        with torch.no_grad(), model.trace(x):
            h = model.layers[0].output
            model.output  # noqa: B018 - the last request
            h.mul_(2)

    seen = caught(run)
    assert len(seen) == 1
    assert (
        f"(edited between {HERE}:{line_of('the last request')}, where the model moved on, and "
        "the end of the body)"
    ) in str(seen[0].message)
