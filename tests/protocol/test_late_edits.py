"""In-place edits that come too late: `LateEditWarning` instead of a silent no-op.

A body may edit `.output` in place while the model stands at that point. Once the model has moved
on (the body asked for a later value, or waited for another invoke's name), an in-place edit of
the earlier value changes nothing in the forward pass. These tests compare every result with
plain PyTorch (the edit really had no effect, or really took effect) and check when the warning
is given and when it is not.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import mediator


@pytest.fixture
def net() -> nn.Sequential:
    """Layer 0's output is layer 1's input; layer 2 edits layer 1's output in place itself."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4))


@pytest.fixture
def model(net: nn.Sequential) -> mediator.Model:
    return mediator.Model(net)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 4)


def _zeroed(net: nn.Module, module: nn.Module, x: torch.Tensor, pre: bool = False) -> torch.Tensor:
    """The plain-PyTorch oracle: `net(x)` with `module`'s output (or input) replaced by zeros."""
    if pre:
        handle = module.register_forward_pre_hook(lambda m, a: (torch.zeros_like(a[0]),))
    else:
        handle = module.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        return net(x)
    finally:
        handle.remove()


def _late_edits(run: Callable[[], None]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [w for w in caught if issubclass(w.category, mediator.LateEditWarning)]


def test_an_edit_after_a_later_request_warns_at_that_request_and_changes_nothing(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            h = model[0].output
            model[1].output  # noqa: B018 - the model runs past layer 0
            h[:] = 0
            got["out"] = model.output  # the next request: where the warning points

    caught = _late_edits(run)
    assert len(caught) == 1
    assert "0.output (call 0) was changed in place after the model had already used it" in str(
        caught[0].message
    )
    assert caught[0].filename == __file__
    assert "got[" in open(__file__).read().splitlines()[caught[0].lineno - 1]
    with torch.no_grad():
        torch.testing.assert_close(got["out"], net(x))  # as if the edit had not been made


def test_an_edit_while_waiting_for_another_invokes_name_is_reported(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    """The case that was silent: the body waits for `both`, bound after layer 1, so the model
    is past layer 0 when the body makes its edit."""
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(x):
                both = [model[0].output, model[1].output]
            with tr.invoke(x):
                h = model[0].output
                h[:] = both[0] * 0
                got["out"] = model.output

    caught = _late_edits(run)
    assert [str(w.message).split(" was")[0] for w in caught] == ["0.output (call 0)"]
    with torch.no_grad():
        torch.testing.assert_close(got["out"], net(x))


def test_an_edit_in_time_takes_effect_without_a_warning(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            h = model[0].output
            h[:] = 0
            got["out"] = model.output

    assert _late_edits(run) == []
    with torch.no_grad():
        torch.testing.assert_close(got["out"], _zeroed(net, net[0], x))


def test_an_edit_through_the_next_modules_input_is_in_time(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    """Layer 0's output is layer 1's input: the same memory, edited where the model stands."""
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            model[0].output  # noqa: B018 - read, then passed
            model[1].input[:] = 0
            got["out"] = model.output

    assert _late_edits(run) == []
    with torch.no_grad():
        torch.testing.assert_close(got["out"], _zeroed(net, net[1], x, pre=True))


def test_the_models_own_in_place_ops_are_not_the_bodys_edits(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    """ReLU(inplace=True) changes layer 1's output after the body read it."""
    seen = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            seen["h"] = model[1].output
            seen["out"] = model.output

    assert _late_edits(run) == []
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], net(x))
        assert (seen["h"] >= 0).all()  # the real tensor, changed by the model's in-place ReLU


def test_an_edit_after_the_last_request_is_reported_at_the_trace(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            h = model[0].output
            model.output  # noqa: B018
            h.mul_(2)

    caught = _late_edits(run)
    assert len(caught) == 1 and caught[0].filename == __file__


def test_only_the_invoke_that_edited_late_is_reported(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(x[:1]):  # in time
                model[0].output[:] = 0
                got["first"] = model.output
            with tr.invoke(x[1:]):  # late: after asking for layer 1
                h = model[0].output
                model[1].output  # noqa: B018
                h[:] = 0
                got["second"] = model.output

    caught = _late_edits(run)
    assert len(caught) == 1
    with torch.no_grad():
        torch.testing.assert_close(got["first"], _zeroed(net, net[0], x[:1]))
        torch.testing.assert_close(got["second"], net(x[1:]))


def test_inference_mode_values_are_not_watched(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    """Inference tensors keep no version counter: nothing to compare, and nothing fails."""
    got = {}

    def run() -> None:
        with torch.inference_mode(), model.trace(x):
            h = model[0].output
            got["out"] = model.output
            got["h"] = h

    assert _late_edits(run) == []
    with torch.inference_mode():
        torch.testing.assert_close(got["out"], net(x))


def test_the_warning_can_be_filtered_by_its_category(
    net: nn.Sequential, model: mediator.Model, x: torch.Tensor
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=mediator.LateEditWarning)
        with torch.no_grad(), model.trace(x):
            h = model[0].output
            model.output  # noqa: B018
            h[:] = 0
    with pytest.warns(mediator.LateEditWarning):
        with torch.no_grad(), model.trace(x):
            h = model[0].output
            model.output  # noqa: B018
            h[:] = 0


def test_values_without_one_storage_are_not_reported_and_do_not_fail() -> None:
    """Sparse tensors have no single storage to compare: never reported, never an error."""

    class ToSparse(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to_sparse()

    class ToDense(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to_dense()

    net = nn.Sequential(ToSparse(), ToDense())
    model = mediator.Model(net)
    x = torch.randn(2, 3)
    got = {}

    def run() -> None:
        with torch.no_grad(), model.trace(x):
            sparse = model[0].output
            model[1].output  # noqa: B018
            sparse.mul_(2)
            got["out"] = model.output

    assert _late_edits(run) == []
    torch.testing.assert_close(got["out"], x)
