"""Every kind of error: the right type, a message that names the module path, the
call and what to do instead, raised at the right moment, and nothing left behind."""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
from conftest import assert_untouched, hook_count, patched_forwards
from torch import nn

import mediator
from mediator import (
    MediatorError,
    MissedProviderError,
    OutOfOrderError,
    ShapeError,
    SourceUnavailableError,
    UsageError,
)

HERE = os.path.abspath(__file__)


class Branchy(nn.Module):
    """A model with a conditional branch: `branch` runs only when asked, `unused` never."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.branch = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, use_branch: bool = False) -> torch.Tensor:
        h = self.encoder(x)
        if use_branch:
            h = self.branch(h)
        return self.head(h)


class ModelFailure(Exception):
    """An exception type only the model raises."""


class Faulty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        raise ModelFailure("the model itself failed")  # model-raise-marker


@pytest.fixture
def branchy() -> Branchy:
    torch.manual_seed(2)
    return Branchy()


def _last_frame(error: BaseException) -> traceback.FrameSummary:
    return traceback.extract_tb(error.__traceback__)[-1]


# -- OutOfOrderError -----------------------------------------------------------------------------


def test_out_of_order_output_raised_in_body_at_once(net, model, x):
    """Reading layer 1 after layer 2 fails in the body before the forward moves on: the body
    can catch it and still read the model's output, and the last layer has not run yet."""
    last_layer_calls: list[int] = []
    handle = net.layers[3].register_forward_hook(lambda m, i, o: last_layer_calls.append(1))
    try:
        with model.trace(x):
            late = model.layers[2].output
            try:
                early = model.layers[1].output
            except OutOfOrderError as error:
                message = str(error)
                last_layer_ran_when_caught = len(last_layer_calls)
            out = model.output
    finally:
        handle.remove()
    assert last_layer_ran_when_caught == 0
    assert "early" not in locals()  # never bound: the read raised
    assert "layers.1.output" in message
    assert "call 0" in message
    assert "layers.2.output" in message  # where the model is now
    assert "order" in message  # what to do: request values in the order the model computes them
    assert torch.equal(out, net(x))
    assert late.shape == (3, 8)
    assert last_layer_calls == [1]  # the forward went on to the end, once


def test_out_of_order_uncaught_reaches_the_with_with_the_users_line(net, model, x):
    with pytest.raises(OutOfOrderError) as info:
        with model.trace(x):
            model.layers[3].output
            model.layers[0].output  # out-of-order-marker
    frame = _last_frame(info.value)
    assert frame.filename == HERE
    assert "out-of-order-marker" in frame.line
    assert "layers.0.output (call 0)" in str(info.value)
    assert isinstance(info.value, MediatorError)
    assert_untouched(net)


def test_out_of_order_input_of_a_passed_layer(net, model, x):
    last_layer_calls: list[int] = []
    handle = net.layers[3].register_forward_hook(lambda m, i, o: last_layer_calls.append(1))
    try:
        with model.trace(x):
            model.layers[2].output
            try:
                model.layers[1].input
            except OutOfOrderError as error:
                message = str(error)
                ran = len(last_layer_calls)
            out = model.output
    finally:
        handle.remove()
    assert ran == 0
    assert "layers.1.input (call 0)" in message
    assert torch.equal(out, net(x))


def test_out_of_order_input_of_the_current_layers_input(net, model, x):
    """Once layer 2's output is served, layer 2's input has passed too."""
    with pytest.raises(OutOfOrderError, match=r"layers\.2\.input \(call 0\)"):
        with model.trace(x):
            model.layers[2].output
            model.layers[2].input
    assert_untouched(net)


def test_out_of_order_swap_of_a_passed_layer(net, model, x):
    with pytest.raises(OutOfOrderError, match=r"layers\.0\.output \(call 0\)"):
        with model.trace(x):
            h = model.layers[1].output
            model.layers[0].output = torch.zeros(3, 8)
    assert_untouched(net)


# -- MissedProviderError ------------------------------------------------------------------------


def test_missed_provider_names_the_module_never_called(branchy, x):
    model = mediator.Model(branchy)
    with pytest.raises(MissedProviderError) as info:
        with model.trace(x):
            h = model.branch[0].output
    message = str(info.value)
    assert "branch.0.output" in message
    assert "call 0" in message
    assert "not called" in message
    assert isinstance(info.value, MediatorError)
    assert_untouched(branchy)


def test_missed_provider_for_a_submodule_that_never_runs(branchy, x):
    """Requests before the miss are served; the miss is reported after the forward."""
    model = mediator.Model(branchy)
    with pytest.raises(MissedProviderError, match=r"unused\.output \(call 0\)") as info:
        with model.trace(x):
            enc = model.encoder.output
            u = model.unused.output
    assert "unused was not called" in str(info.value)
    assert enc.shape == (3, 8)  # bound before the error, written back
    assert_untouched(branchy)


def test_missed_provider_when_the_branch_runs_is_not_raised(branchy, x):
    model = mediator.Model(branchy)
    with model.trace(x, use_branch=True):
        h = model.branch[0].output
        out = model.output
    assert torch.equal(out, branchy(x, use_branch=True))


def test_missed_provider_for_a_swap_names_the_line_of_the_swap(branchy, x):
    model = mediator.Model(branchy)
    with pytest.raises(MissedProviderError) as info:
        with model.trace(x):
            line = sys._getframe().f_lineno + 1  # the line of the swap below
            model.unused.output = torch.zeros(3, 8)
    message = str(info.value)
    assert "unused.output (call 0)" in message
    assert f"{HERE}:{line}" in message
    assert "never used" in message
    assert_untouched(branchy)


def test_missed_provider_for_a_swap_while_the_body_reads_on(branchy, x):
    model = mediator.Model(branchy)
    with pytest.raises(MissedProviderError) as info:
        with model.trace(x):
            line = sys._getframe().f_lineno + 1  # the line of the swap below
            model.unused.output = torch.zeros(3, 8)
            out = model.output
    assert f"{HERE}:{line}" in str(info.value)
    assert "unused.output" in str(info.value)
    assert_untouched(branchy)


# -- UsageError ---------------------------------------------------------------------------------


def test_usage_error_hierarchy():
    assert issubclass(UsageError, MediatorError)
    assert issubclass(ShapeError, MediatorError)
    assert issubclass(OutOfOrderError, MediatorError)
    assert issubclass(MissedProviderError, MediatorError)
    assert issubclass(SourceUnavailableError, MediatorError)


@pytest.mark.parametrize("what", ["output", "input", "inputs"])
def test_reading_outside_a_trace(model, what):
    with pytest.raises(UsageError) as info:
        getattr(model.layers[0], what)
    message = str(info.value)
    assert f"model.layers.0.{what}" in message
    assert "inside an invoke body" in message
    assert "call the model or module directly" in message  # what to do instead


def test_setting_output_outside_a_trace(net, model):
    with pytest.raises(UsageError, match=r"model\.layers\.1\.output"):
        model.layers[1].output = torch.zeros(3, 8)
    with pytest.raises(UsageError, match=r"model\.output"):
        model.output
    assert patched_forwards(net) == []


def test_invoke_nested_inside_an_invoke_body(net, model, x):
    with pytest.raises(UsageError) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                h = model.layers[0].output
                with tr.invoke(x):
                    g = model.layers[1].output
    message = str(info.value)
    assert "cannot be nested" in message
    assert "with model.trace() as tr" in message  # what to do instead
    assert_untouched(net)


def test_run_nested_inside_an_invoke_body(net, model, x):
    with pytest.raises(UsageError, match="cannot be nested"):
        with model.trace() as tr:
            with tr.invoke(x):
                h = model.layers[0].output
                tr.invoke(x).run(lambda: None)
    assert_untouched(net)


def test_invoke_inside_a_trace_with_inputs(net, model, x):
    with pytest.raises(UsageError) as info:
        with model.trace(x) as tr:
            with tr.invoke(x):
                h = model.layers[0].output
    message = str(info.value)
    assert "with model.trace(x)" in message
    assert "single invoke" in message
    assert "tr.invoke(x) per input" in message  # what to do instead
    assert_untouched(net)


def test_no_inputs_anywhere(net, model):
    with pytest.raises(UsageError) as info:
        with model.trace() as tr:
            with tr.invoke():
                out = model.output
    message = str(info.value)
    assert "no invoke of this trace has inputs" in message
    assert "model.trace(x)" in message and "tr.invoke(x)" in message
    assert_untouched(net)


def test_run_with_a_non_callable(net, model, x):
    with pytest.raises(TypeError) as info:
        with model.trace() as tr:
            tr.invoke(x).run(5)
    message = str(info.value)
    assert "callable" in message and "int" in message
    assert ".run(fn, arg)" in message  # what to do instead
    assert_untouched(net)


def test_module_container_has_no_output(net, model, x):
    with pytest.raises(UsageError) as info:
        with model.trace(x):
            h = model.layers.output
    message = str(info.value)
    assert "model.layers" in message and "ModuleList" in message
    assert "model.layers[0].output" in message  # what to do instead
    assert_untouched(net)


def test_source_unavailable_names_the_function_form(net, model, x):
    namespace = {"model": model, "x": x}
    code = compile("with model.trace(x):\n    out = model.output\n", "<string>", "exec")
    with pytest.raises(SourceUnavailableError) as info:
        exec(code, namespace)
    assert isinstance(info.value, UsageError)
    assert ".run(fn)" in str(info.value)
    assert_untouched(net)


# -- AttributeError -----------------------------------------------------------------------------


def test_unknown_child_suggests_close_names(model):
    with pytest.raises(AttributeError) as info:
        model.layer
    message = str(info.value)
    assert "'layer'" in message
    assert "Did you mean" in message and "'layers'" in message
    assert not hasattr(model, "layer")


def test_unknown_nested_child_suggests_close_names(branchy):
    model = mediator.Model(branchy)
    with pytest.raises(AttributeError, match="'encoder'"):
        model.encodr
    with pytest.raises(AttributeError, match="'branch'"):
        model.brunch


def test_unknown_child_inside_a_body_reaches_the_with(net, model, x):
    with pytest.raises(AttributeError, match="'layers'"):
        with model.trace(x):
            h = model.layer[0].output
    assert_untouched(net)


# -- ShapeError ---------------------------------------------------------------------------------


def test_swap_of_the_wrong_shape(net, model, x):
    with pytest.raises(ShapeError) as info:
        with model.trace(x):
            line = sys._getframe().f_lineno + 1  # the line of the swap below
            model.layers[1].output = torch.zeros(3, 5)
            out = model.output
    message = str(info.value)
    assert isinstance(info.value, MediatorError) and isinstance(info.value, ValueError)
    assert "layers.1.output (call 0)" in message
    assert "[3, 8]" in message  # expected
    assert "[3, 5]" in message  # got
    assert f"{HERE}:{line}" in message
    assert_untouched(net)
    assert torch.equal(net(x), net(x))


def test_swap_of_a_dtype_that_cannot_be_cast(net, model, x):
    """A complex value over a float output would lose its imaginary part: refused, not cast."""
    with pytest.raises(ShapeError) as info:
        with model.trace(x):
            model.layers[2].output = torch.zeros(3, 8, dtype=torch.complex64)
            out = model.output
    message = str(info.value)
    assert "layers.2.output (call 0)" in message
    assert "complex64" in message and "float32" in message
    assert "[3, 8]" in message
    assert_untouched(net)


def test_swap_on_the_wrong_device(net, model, x):
    """A value that holds no data (on the meta device) cannot be moved to the output's device:
    refused with both devices named."""
    with pytest.raises(ShapeError) as info:
        with model.trace(x):
            model.layers[2].output = torch.zeros(3, 8, device="meta")
            out = model.output
    message = str(info.value)
    assert "layers.2.output (call 0)" in message
    assert "meta" in message and "cpu" in message
    assert_untouched(net)


def test_swap_of_the_wrong_shape_at_the_current_boundary_raises_at_the_swap(net, model, x):
    """A swap at the boundary the model stands at is checked at once, in the body."""
    with model.trace(x):
        h = model.layers[1].output
        try:
            model.layers[1].output = torch.zeros(2, 8)
        except ShapeError as error:
            message = str(error)
        out = model.output
    assert "layers.1.output (call 0)" in message and "[3, 8]" in message
    assert torch.equal(out, net(x))


def test_swap_of_the_wrong_shape_in_one_invoke_of_two(net, model, x):
    """Each invoke's view has its own rows: the expected shape is the invoke's, not the batch's."""
    with pytest.raises(ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.layers[1].output
            with tr.invoke(x[:2]):
                model.layers[1].output = torch.zeros(3, 8)
                b = model.output
    assert "layers.1.output (call 0)" in str(info.value)
    assert "expected tensor[2, 8]" in str(info.value)
    assert_untouched(net)


def test_inputs_that_cannot_be_batched(net, model, x):
    with pytest.raises(ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.output
            with tr.invoke(torch.randn(2, 7)):
                b = model.output
    message = str(info.value)
    assert "input 0" in message
    assert "[3, 8]" in message and "[2, 7]" in message
    assert "invoke 1" in message
    assert_untouched(net)


def test_keyword_inputs_that_cannot_be_batched_name_the_keyword(net, model, x):
    with pytest.raises(ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(x=x):
                a = model.output
            with tr.invoke(x=torch.randn(2, 4)):
                b = model.output
    assert "input 'x'" in str(info.value)
    assert "[3, 8]" in str(info.value) and "[2, 4]" in str(info.value)
    assert_untouched(net)


def test_inputs_of_different_signatures_cannot_be_batched(net, model, x):
    with pytest.raises(ShapeError, match="invoke 1"):
        with model.trace() as tr:
            with tr.invoke(x):
                a = model.output
            with tr.invoke(x=x):
                b = model.output
    assert_untouched(net)


# -- exceptions in a body or in the model -------------------------------------------------------


def test_user_exception_keeps_its_type_and_the_users_line(net, model, x):
    with pytest.raises(IndexError) as info:
        with model.trace(x):
            h = model.layers[1].output
            [][h.shape[0]]  # user-raise-marker
    frame = _last_frame(info.value)
    assert frame.filename == HERE
    assert "user-raise-marker" in frame.line
    assert not isinstance(info.value, MediatorError)
    assert_untouched(net)


def _helper_that_fails(value: torch.Tensor) -> None:
    raise LookupError(f"no row {value.shape[0]}")  # helper-raise-marker


def test_user_exception_in_a_helper_keeps_both_user_frames(net, model, x):
    with pytest.raises(LookupError) as info:
        with model.trace(x):
            h = model.layers[2].output
            _helper_that_fails(h)  # helper-call-marker
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == HERE and "helper-raise-marker" in frames[-1].line
    assert frames[-2].filename == HERE and "helper-call-marker" in frames[-2].line
    assert all("mediator" + os.sep + "_" not in f.filename for f in frames[-2:])
    assert_untouched(net)


def test_user_exception_is_caught_by_its_own_type(model, x):
    caught = False
    try:
        with model.trace(x):
            h = model.layers[0].output
            raise KeyError("mine")
    except KeyError as error:
        caught = error.args == ("mine",)
    assert caught


def test_user_exception_from_a_function_invoke(net, model, x):
    def fails() -> None:
        model.layers[1].output
        raise ArithmeticError("from fn")  # fn-raise-marker

    with pytest.raises(ArithmeticError) as info:
        with model.trace() as tr:
            future = tr.invoke(x).run(fails)
    frame = _last_frame(info.value)
    assert frame.filename == HERE and "fn-raise-marker" in frame.line
    assert isinstance(future.exception(timeout=0), ArithmeticError)
    assert_untouched(net)


def test_model_exception_keeps_its_type():
    torch.manual_seed(3)
    faulty = Faulty()
    model = mediator.Model(faulty)
    with pytest.raises(ModelFailure, match="the model itself failed") as info:
        with model.trace(torch.randn(2, 8)):
            h = model.first.output
            out = model.output
    frame = _last_frame(info.value)
    assert frame.filename == HERE and "model-raise-marker" in frame.line
    assert h.shape == (2, 8)  # read before the failure, written back
    assert_untouched(faulty)


def test_model_exception_from_torch_keeps_its_type(net, model):
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with model.trace(torch.randn(3, 5)):
            out = model.output
    assert_untouched(net)


# -- one invoke fails while another waits -------------------------------------------------------


def test_error_in_invoke_2_while_invoke_1_waits(net, model, x):
    hooks = hook_count(net)
    reached: list[str] = []
    with pytest.raises(KeyError, match="from invoke 2") as info:
        with model.trace() as tr:
            with tr.invoke(x):
                late = model.layers[3].output  # waits while invoke 2 fails at layer 0
                reached.append("invoke 1 after its read")
            with tr.invoke(x):
                early = model.layers[0].output
                raise KeyError("from invoke 2")  # invoke-2-marker
    assert "invoke-2-marker" in _last_frame(info.value).line
    assert reached == []  # invoke 1 was cancelled, not resumed
    assert_untouched(net)
    assert hook_count(net) == hooks
    with model.trace(x):
        out = model.output
    assert torch.equal(out, net(x))


def test_error_in_invoke_1_while_invoke_2_waits(net, model, x):
    reached: list[str] = []
    with pytest.raises(ValueError, match="from invoke 1"):
        with model.trace() as tr:
            with tr.invoke(x):
                h = model.layers[1].output
                raise ValueError("from invoke 1")
            with tr.invoke(x):
                h2 = model.layers[2].output
                reached.append("invoke 2 after its read")
    assert reached == []
    assert_untouched(net)


def test_error_in_invoke_2_before_any_request(net, model, x):
    with pytest.raises(ZeroDivisionError):
        with model.trace() as tr:
            with tr.invoke(x):
                late = model.layers[3].output
            with tr.invoke(x):
                1 / 0
    assert_untouched(net)
