"""Single-invoke traces (`with model.trace(x): ...`), checked against plain PyTorch.

Every behaviour test computes an oracle with plain forward hooks (or a hand-written forward) on
the same module and compares with exact equality: one invoke runs the very same forward pass, so
nothing but the intervention may differ.
"""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import dataclasses
import os
import runpy
import textwrap
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mediator

# -- oracles: plain PyTorch hooks ------------------------------------------------------------


def hooked(
    net: nn.Module,
    *args: Any,
    out: dict[nn.Module, Callable[[Any], Any]] | None = None,
    pre: dict[nn.Module, Callable[[tuple, dict], Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """`net(*args, **kwargs)` with forward hooks `out[m](output)` (returning a replacement or
    None) and pre-hooks `pre[m](args, kwargs)` (returning `(args, kwargs)` or None), removed
    afterwards."""
    handles = []
    try:
        for module, fn in (out or {}).items():
            handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
        for module, fn in (pre or {}).items():
            handles.append(
                module.register_forward_pre_hook(lambda m, a, k, fn=fn: fn(a, k), with_kwargs=True)
            )
        return net(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def seen(net: nn.Module, module: nn.Module, *args: Any, inputs: bool = False) -> Any:
    """What a hook on `module` sees in a plain run: its output, or `(args, kwargs)`."""
    record: list[Any] = []

    def keep(*value: Any) -> None:
        record.append(value if inputs else value[0])

    if inputs:
        hooked(net, *args, pre={module: keep})
    else:
        hooked(net, *args, out={module: keep})
    assert len(record) == 1
    return record[0]


def line_of(marker: str) -> int:
    """The line of this file that ends with the comment `# <marker>`."""
    with open(__file__, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    hits = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, hits
    return hits[0]


def no_taps(net: nn.Module) -> bool:
    """No module of `net` carries an instance `forward` (what a trace installs while it runs)."""
    return all("forward" not in module.__dict__ for module in net.modules())


def same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


# -- small models ----------------------------------------------------------------------------


class Counted(nn.Linear):
    """A Linear that counts how often its forward runs."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


class CountedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Counted() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Scale(nn.Module):
    """Called with keyword arguments only."""

    def forward(self, x: torch.Tensor | None = None, factor: float = 1.0) -> torch.Tensor:
        assert x is not None
        return x * factor


class KwNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = Scale()
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(x=self.lin(x), factor=2.0))


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    score: torch.Tensor


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h, h.sum(-1)


class DictBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.lin(h), "aux": h * 2}


class DataBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h: torch.Tensor) -> Out:
        y = self.lin(h)
        return Out(hidden=y, score=y.mean(-1))


class Nested(nn.Module):
    """Modules returning a tuple, a dict and a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.tup = TupleBlock()
        self.dic = DictBlock()
        self.dat = DataBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, s = self.tup(x)
        d = self.dic(h + s[:, None])
        o = self.dat(d["hidden"] + d["aux"])
        return o.hidden * o.score[:, None]


class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise ValueError("boom from the model")  # MODEL-RAISE
        return x


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


# == 1. Wrapping a model =====================================================================


def test_envoy_tree_mirrors_named_children(model, net, x):
    for path, sub in net.named_modules():
        envoy = model
        for part in path.split(".") if path else []:
            envoy = getattr(envoy, part)
        assert envoy.path == path
        assert isinstance(envoy, mediator.Envoy)
        if isinstance(sub, nn.Linear):
            # attribute fall-through reaches this very module, and a call is a plain call
            assert envoy.weight is sub.weight
            assert torch.equal(envoy(x), sub(x))
    assert model.path == ""
    assert [name for name, _ in net.named_children()] == ["layers"]
    assert model.layers.path == "layers"
    assert model.layers[0].path == "layers.0"


def test_module_list_envoy_is_a_sequence(model, net):
    assert len(model.layers) == len(net.layers) == 4
    assert [e.path for e in model.layers] == [f"layers.{i}" for i in range(4)]
    assert [e.path for e in list(model.layers)] == [f"layers.{i}" for i in range(4)]
    assert model.layers[-1].path == "layers.3"
    assert model.layers[-4].path == "layers.0"
    assert model.layers[-1].weight is net.layers[3].weight
    with pytest.raises(IndexError):
        model.layers[4]
    with pytest.raises(IndexError):
        model.layers[-5]
    assert [e.path for e in model.layers[1:3]] == ["layers.1", "layers.2"]
    assert isinstance(model.layers[1:3], tuple)


def test_child_by_string_name(model, net):
    assert model["layers"].path == "layers"
    assert model.layers["2"].path == "layers.2"
    assert model.layers["2"].weight is net.layers[2].weight
    with pytest.raises((KeyError, AttributeError)):
        model["nope"]


def test_attributes_fall_through_to_module(model, net):
    net.config = {"hidden": 8, "name": "tiny"}
    assert model.config is net.config
    assert model.training is net.training
    assert model.layers[0].in_features == 8
    assert list(model.parameters()) == list(net.parameters())


def test_plain_call_equals_module_call(net, x):
    before = net(x)
    model = mediator.Model(net)
    assert torch.equal(model(x), before)
    assert torch.equal(net(x), before)  # net is usable alone and unchanged
    assert torch.equal(model.layers[1](x), net.layers[1](x))


def test_print_shows_module_tree(model, net, capsys):
    print(model)
    printed = capsys.readouterr().out
    assert printed.strip() == repr(net).strip()
    assert "(layers): ModuleList" in printed
    assert "Linear(in_features=8, out_features=8" in printed
    assert "Linear(in_features=8, out_features=8" in repr(model.layers[0])


def test_unknown_child_suggests_closest_name(model):
    with pytest.raises(AttributeError) as info:
        model.layer
    assert "'layers'" in str(info.value)
    assert not hasattr(model, "layerz")
    with pytest.raises(AttributeError, match="layers"):
        model.lyers


# == 2. Reading and writing values ===========================================================


def test_read_output_equals_hook_value(model, net, x):
    expected_h = seen(net, net.layers[1], x)
    expected_out = net(x)
    with model.trace(x):
        h = model.layers[1].output
        out = model.output
    assert torch.equal(h, expected_h)
    assert torch.equal(out, expected_out)


def test_write_output(model, net, x):
    expected = hooked(net, x, out={net.layers[1]: lambda o: o * 2})
    with model.trace(x):
        h = model.layers[1].output
        model.layers[1].output = h * 2
        out = model.output
    assert torch.equal(out, expected)
    assert not torch.equal(out, net(x))
    assert torch.equal(model(x), net(x))  # nothing stays after the trace


def test_in_place_edit_of_output(model, net, x):
    def zero_first_column(o):
        o[:, 0] = 0

    expected = hooked(net, x, out={net.layers[1]: zero_first_column})
    with model.trace(x):
        model.layers[1].output[:, 0] = 0
        again = model.layers[1].output
        out = model.output
    assert torch.equal(out, expected)
    assert torch.equal(again[:, 0], torch.zeros(3))
    assert torch.equal(again[:, 1:], seen(net, net.layers[1], x)[:, 1:])


def test_read_after_set_returns_set_value(model, net, x):
    torch.manual_seed(5)
    v = torch.randn(3, 8)
    expected = hooked(net, x, out={net.layers[2]: lambda o: v})
    with model.trace(x):
        model.layers[2].output = v
        back = model.layers[2].output
        out = model.output
    assert torch.equal(back, v)
    assert torch.equal(out, expected)


def test_read_set_read_at_current_point(model, net, x):
    expected_h = seen(net, net.layers[0], x)
    expected = hooked(net, x, out={net.layers[0]: lambda o: o + 1})
    with model.trace(x):
        first = model.layers[0].output.clone()
        model.layers[0].output = model.layers[0].output + 1
        second = model.layers[0].output
        out = model.output
    assert torch.equal(first, expected_h)
    assert torch.equal(second, expected_h + 1)
    assert torch.equal(out, expected)


def test_read_inputs_and_input(model, net, x):
    args, kwargs = seen(net, net.layers[2], x, inputs=True)
    with model.trace(x):
        got_args, got_kwargs = model.layers[2].inputs
        first = model.layers[2].input
    assert len(got_args) == len(args) == 1
    assert torch.equal(got_args[0], args[0])
    assert got_kwargs == kwargs == {}
    assert torch.equal(first, args[0])


def test_set_input(model, net, x):
    expected = hooked(net, x, pre={net.layers[2]: lambda a, k: ((a[0] + 1,), k)})
    with model.trace(x):
        model.layers[2].input = model.layers[2].input + 1
        back = model.layers[2].input
        out = model.output
    assert torch.equal(out, expected)
    expected_in = seen(net, net.layers[2], x, inputs=True)[0][0] + 1
    assert torch.equal(back, expected_in)


def test_set_inputs(model, net, x):
    torch.manual_seed(7)
    v = torch.randn(3, 8)
    expected = hooked(net, x, pre={net.layers[3]: lambda a, k: ((v,), {})})
    with model.trace(x):
        model.layers[3].inputs = ((v,), {})
        args, kwargs = model.layers[3].inputs
        out = model.output
    assert torch.equal(out, expected)
    assert torch.equal(args[0], v) and kwargs == {}


def test_set_inputs_needs_args_and_kwargs(model, x):
    with pytest.raises(TypeError, match="inputs"):
        with model.trace(x):
            model.layers[3].inputs = x


class DictInput(nn.Module):
    """Takes its input as a dict under a keyword, as some models take `inputs={...}`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, *, inputs: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        return self.proj(inputs["x"]) * scale


def test_a_keyword_holding_tensors_makes_the_trace_its_own_invoke(x):
    """`model.trace(inputs={"x": t})` has inputs (a tensor inside a dict): the with-body is the
    single invoke, not a trace of several with `inputs` as a call option."""
    torch.manual_seed(0)
    net = DictInput()
    model = mediator.Model(net)
    with model.trace(inputs={"x": x}, scale=2.0):
        h = model.proj.output
        out = model.output
    torch.testing.assert_close(h, net.proj(x))
    torch.testing.assert_close(out, net(inputs={"x": x}, scale=2.0))


def test_keyword_only_call_input(x):
    torch.manual_seed(0)
    net = KwNet()
    model = mediator.Model(net)
    args, kwargs = seen(net, net.scale, x, inputs=True)
    torch.manual_seed(3)
    v = torch.randn(3, 8)
    expected = hooked(net, x, pre={net.scale: lambda a, k: (a, {**k, "x": v})})
    with model.trace(x):
        got_args, got_kwargs = model.scale.inputs
        first = model.scale.input
        model.scale.input = v
        out = model.output
    assert got_args == args == ()
    assert set(got_kwargs) == {"x", "factor"} and got_kwargs["factor"] == 2.0
    assert torch.equal(got_kwargs["x"], kwargs["x"])
    assert torch.equal(first, kwargs["x"])
    assert torch.equal(out, expected)


def test_root_output_and_input(model, net, x):
    with model.trace(x):
        inp = model.input
        args, kwargs = model.inputs
        out = model.output
    assert torch.equal(inp, x)
    assert torch.equal(args[0], x) and kwargs == {}
    assert torch.equal(out, net(x))


def test_set_root_input_and_output(model, net, x):
    with model.trace(x):
        model.input = x * 0.5
        out = model.output
    assert torch.equal(out, net(x * 0.5))
    with model.trace(x):
        model.output = model.output * 3
        final = model.output
    assert torch.equal(final, hooked(net, x, out={net: lambda o: o * 3}))


def test_swap_wrong_shape_names_module_and_shape(model, net, x):
    with pytest.raises(mediator.ShapeError) as info:
        with model.trace(x):
            model.layers[1].output = torch.zeros(5, 8)
            model.output
    message = str(info.value)
    assert "layers.1" in message
    assert "[3, 8]" in message and "[5, 8]" in message
    assert isinstance(info.value, mediator.MediatorError)
    assert torch.equal(model(x), net(x))


def test_swap_of_a_dtype_that_cannot_be_cast_is_a_shape_error(model, x):
    with pytest.raises(mediator.ShapeError, match="layers.0"):
        with model.trace(x):
            h = model.layers[0].output
            model.layers[0].output = h.to(torch.complex64)


def test_set_input_wrong_shape_is_shape_error(model, net, x):
    with pytest.raises(mediator.ShapeError, match="layers.2"):
        with model.trace(x):
            model.layers[2].input = torch.zeros(5, 8)
            model.output
    assert torch.equal(model(x), net(x))


def test_swap_out_of_order(model, x):
    with pytest.raises(mediator.OutOfOrderError, match="layers.1"):
        with model.trace(x):
            h = model.layers[2].output
            model.layers[1].output = h


def test_swap_of_module_never_called_is_missed_provider(x):
    net = WithUnused()
    model = mediator.Model(net)
    with pytest.raises(mediator.MissedProviderError, match="unused"):
        with model.trace(x):
            model.unused.output = torch.zeros(3, 8)
            out = model.output


def test_container_without_forward_is_usage_error(model, x):
    with pytest.raises(mediator.UsageError, match="layers"):
        with model.trace(x):
            model.layers.output


def test_output_outside_trace_is_usage_error(model, x):
    with pytest.raises(mediator.UsageError):
        model.layers[0].output
    with pytest.raises(mediator.UsageError):
        model.layers[0].output = x
    with pytest.raises(mediator.MediatorError):
        model.output
    with pytest.raises(mediator.UsageError):
        model.layers[0].skip(x)


def test_out_of_order_request(model, net, x):
    with pytest.raises(mediator.OutOfOrderError) as info:
        with model.trace(x):
            late = model.layers[2].output
            early = model.layers[1].output  # OUT-OF-ORDER
    assert "layers.1" in str(info.value)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("OUT-OF-ORDER")
    assert torch.equal(model(x), net(x))


def test_module_never_called_is_missed_provider(x):
    net = WithUnused()
    model = mediator.Model(net)
    with pytest.raises(mediator.MissedProviderError, match="unused"):
        with model.trace(x):
            model.unused.output


def test_invoke_inside_trace_with_inputs_is_usage_error(model, x):
    with pytest.raises(mediator.UsageError):
        with model.trace(x) as tr:
            with tr.invoke(x):
                model.output


# == calling a submodule from a body =========================================================


def test_submodule_call_in_body_is_plain(model, net, x):
    h2 = seen(net, net.layers[2], x)
    h3 = seen(net, net.layers[3], x)
    calls = []
    handle = net.layers[3].register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with model.trace(x):
            early = model.layers[0].output
            lens_early = model.layers[3](early)  # before the model's own call of layers[3]
            h = model.layers[2].output
            lens = model.layers[3](h)
            own = model.layers[3].output
            out = model.output
    finally:
        handle.remove()
    assert torch.equal(lens_early, net.layers[3](seen(net, net.layers[0], x)))
    assert torch.equal(lens, net.layers[3](h2))
    assert torch.equal(own, h3)
    assert torch.equal(out, net(x))
    assert len(calls) == 3  # two plain calls from the body, one by the model


# == Python in a body ========================================================================


def test_control_flow_loops_and_print_in_body(model, net, x, capsys):
    hs = [seen(net, layer, x) for layer in net.layers]
    expected = hooked(
        net,
        x,
        out={layer: lambda o: o * 0.5 if o.norm() > 1 else o * 2.0 for layer in net.layers},
    )
    with model.trace(x):
        norms = []
        for layer in model.layers:
            h = layer.output
            norms.append(float(h.detach().norm()))
            if h.norm() > 1:
                layer.output = h * 0.5
            else:
                layer.output = h * 2.0
        print("shape in body:", tuple(h.shape))
        out = model.output
    assert torch.equal(out, expected)
    # norms of the values as the body saw them (after earlier layers' edits)
    assert len(norms) == 4
    assert norms[0] == pytest.approx(float(hs[0].detach().norm()))
    assert "shape in body: (3, 8)" in capsys.readouterr().out


def test_requests_from_a_comprehension_in_body(model, net, x):
    with model.trace(x):
        outs = [model.layers[i].output for i in range(4)]
    for layer, got in zip(net.layers, outs, strict=True):
        assert torch.equal(got, seen(net, layer, x))


def test_one_line_trace_body(model, net, x):
    # fmt: off
    with model.trace(x): out = model.output  # noqa: E701
    # fmt: on
    assert torch.equal(out, net(x))


def test_envoy_of_another_model_is_usage_error(model, x):
    torch.manual_seed(0)
    other = mediator.Model(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(mediator.UsageError):
        with model.trace(x):
            other[0].output


def test_two_models_on_one_module(net, x):
    first, second = mediator.Model(net), mediator.Model(net)
    expected = hooked(net, x, out={net.layers[0]: lambda o: o * 0})
    with second.trace(x):
        second.layers[0].output = second.layers[0].output * 0
        out2 = second.output
    with first.trace(x):
        out1 = first.output
    assert torch.equal(out2, expected)
    assert torch.equal(out1, net(x))


def test_gradient_through_a_swapped_value(model, net, x):
    gate = torch.full((8,), 0.5, requires_grad=True)
    out_ref = hooked(net, x, out={net.layers[1]: lambda o: o * gate})
    out_ref.sum().backward()
    expected_gate = gate.grad.clone()
    expected_w = net.layers[0].weight.grad.clone()
    gate.grad = None
    net.zero_grad()
    with model.trace(x):
        model.layers[1].output = model.layers[1].output * gate
        loss = model.output.sum()
    loss.backward()
    assert torch.equal(gate.grad, expected_gate)
    assert torch.equal(net.layers[0].weight.grad, expected_w)


# == names bound in a body ===================================================================


def test_names_visible_after_block(model, net, x):
    scale = 3.0  # read by the body from the enclosing scope
    with model.trace(x):
        h = model.layers[0].output
        scaled = h * scale
        a, (b, c) = 1, (2, 3)
        for i in range(2):
            last = i
        import math as m
    assert torch.equal(h, seen(net, net.layers[0], x))
    assert torch.equal(scaled, seen(net, net.layers[0], x) * 3.0)
    assert (a, b, c, i, last) == (1, 2, 3, 1, 1)
    assert m.pi == pytest.approx(3.14159, rel=1e-5)


def test_body_rebinds_an_enclosing_name(model, net, x):
    count = 10
    history = []
    with model.trace(x):
        count = count + 1
        history.append(count)
        out = model.output
    assert count == 11 and history == [11]
    assert torch.equal(out, net(x))


def test_trace_in_a_loop(model, net, x):
    results = []
    for scale in (1.0, 2.0, -1.0):
        with model.trace(x):
            model.layers[0].output = model.layers[0].output * scale
            results.append(model.output)
    for scale, got in zip((1.0, 2.0, -1.0), results, strict=True):
        expected = hooked(net, x, out={net.layers[0]: lambda o, scale=scale: o * scale})
        assert torch.equal(got, expected)


def test_trace_with_keyword_input(model, net, x):
    with model.trace(x=x):
        inp = model.input
        args, kwargs = model.inputs
        out = model.output
    assert torch.equal(inp, x)
    assert args == () and set(kwargs) == {"x"}
    assert torch.equal(out, net(x))


def test_names_visible_in_nested_function(model, net, x):
    factor = 2.0

    def inner():
        with model.trace(x):
            h = model.layers[1].output
            model.layers[1].output = h * factor
            out = model.output
        return h, out

    h, out = inner()
    assert torch.equal(h, seen(net, net.layers[1], x))
    assert torch.equal(out, hooked(net, x, out={net.layers[1]: lambda o: o * 2.0}))


def test_names_bound_in_body_that_are_closure_cells(model, net, x):
    with model.trace(x):
        h = model.layers[0].output
    get = lambda: h  # noqa: E731 - makes `h` a cell of this function
    assert torch.equal(get(), seen(net, net.layers[0], x))


def test_body_lambdas_comprehensions_and_functions(model, net, x):
    offset = 0.25  # from the enclosing scope, used inside nested scopes of the body
    with model.trace(x):
        h = model.layers[1].output
        scale = 0.5
        halve = lambda t: t * scale  # noqa: E731
        row_sums = [h[i].sum() * scale for i in range(h.shape[0])]
        gen_total = sum(float(v.detach()) * offset for v in row_sums)

        def shift(t):
            return t + scale + offset

        model.layers[1].output = shift(halve(h))
        out = model.output
    h_ref = seen(net, net.layers[1], x).detach()
    assert torch.equal(out, hooked(net, x, out={net.layers[1]: lambda o: o * 0.5 + 0.5 + 0.25}))
    assert [float(r.detach()) for r in row_sums] == [
        float(h_ref[i].sum().detach() * 0.5) for i in range(3)
    ]
    assert gen_total == pytest.approx(sum(float(h_ref[i].sum() * 0.5) * 0.25 for i in range(3)))
    assert torch.equal(halve(torch.ones(2)), torch.full((2,), 0.5))
    assert torch.equal(shift(torch.zeros(1)), torch.full((1,), 0.75))


MODULE_SCRIPT = """
import torch
import mediator
from torch import nn

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
model = mediator.Model(net)
x = torch.randn(2, 4)
factor = 0.5

with model.trace(x):
    h = model[0].output
    model[0].output = h * factor
    rows = [h[i] * factor for i in range(h.shape[0])]
    twice = lambda t: t * 2
    out = model.output

handle = net[0].register_forward_hook(lambda m, a, o: o * 0.5)
expected = net(x)
handle.remove()
expected_h = net[0](x)
"""


def test_names_visible_at_module_level(tmp_path):
    script = tmp_path / "module_level_trace.py"
    script.write_text(textwrap.dedent(MODULE_SCRIPT))
    names = runpy.run_path(str(script))
    assert torch.equal(names["out"], names["expected"])
    assert torch.equal(names["h"], names["expected_h"])
    assert torch.equal(torch.stack(names["rows"]), names["expected_h"] * 0.5)
    assert torch.equal(names["twice"](torch.ones(1)), torch.full((1,), 2.0))


# == torch thread state ======================================================================


def test_no_grad_covers_the_body(model, net, x):
    with torch.no_grad():
        with model.trace(x):
            h = model.layers[1].output
            w2 = model.layers[1].weight * 2
            y = model.layers[2](h)
            enabled = torch.is_grad_enabled()
            out = model.output
        plain_w2 = net.layers[1].weight * 2
    assert not enabled
    assert plain_w2.requires_grad is False
    for value in (h, w2, y, out):
        assert value.requires_grad is False
    assert torch.equal(w2, net.layers[1].weight.detach() * 2)
    assert torch.equal(out, net(x))

    with model.trace(x):
        h = model.layers[1].output
        w2 = model.layers[1].weight * 2
        y = model.layers[2](h)
        enabled = torch.is_grad_enabled()
    assert enabled
    assert (net.layers[1].weight * 2).requires_grad is True
    for value in (h, w2, y):
        assert value.requires_grad is True


def test_inference_mode_and_autocast_cover_the_body(model, net, x):
    with torch.inference_mode():
        with model.trace(x):
            inference = torch.is_inference_mode_enabled()
            w = model.layers[0].weight * 1
        plain = net.layers[0].weight * 1
    assert inference is True
    assert torch.is_inference(w) and torch.is_inference(plain)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        with model.trace(x):
            h = model.layers[0].output
            lens = model.layers[3](x)
        plain_lens = net.layers[3](x)
    assert lens.dtype == plain_lens.dtype == torch.bfloat16
    assert torch.equal(lens, plain_lens)


# == exceptions ==============================================================================


def test_body_exception_keeps_type_and_user_line(model, net, x):
    caught = None
    try:
        with model.trace(x):
            h = model.layers[0].output
            bad = [0, 1][5]  # BODY-INDEX
    except IndexError as error:  # the original type, caught by a plain except
        caught = error
    assert caught is not None
    frames = traceback.extract_tb(caught.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("BODY-INDEX")
    assert torch.equal(model(x), net(x))


def test_body_exception_before_any_request(model, x):
    with pytest.raises(KeyError) as info:
        with model.trace(x):
            {}["missing"]  # BODY-KEY
    frames = traceback.extract_tb(info.value.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("BODY-KEY")


def test_torch_error_in_body_after_forward(model, x):
    with pytest.raises(RuntimeError) as info:
        with model.trace(x):
            out = model.output
            out @ torch.ones(3, 3)  # BODY-TORCH
    assert not isinstance(info.value, mediator.MediatorError)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("BODY-TORCH")


def _helper_that_fails(t):
    raise ZeroDivisionError("from a helper")  # HELPER-RAISE


def test_body_exception_in_helper_shows_both_lines(model, x):
    with pytest.raises(ZeroDivisionError) as info:
        with model.trace(x):
            h = model.layers[2].output
            _helper_that_fails(h)  # HELPER-CALL
    frames = [f for f in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1].lineno == line_of("HELPER-RAISE")
    assert same_file(frames[-2].filename, __file__)
    assert frames[-2].lineno == line_of("HELPER-CALL")


def test_model_exception_propagates(x):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Boom(), nn.Linear(8, 8))
    model = mediator.Model(net)
    with pytest.raises(ValueError, match="boom from the model") as info:
        with model.trace(x):
            h = model[0].output
            after = model[2].output  # never computed: the model fails first
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].lineno == line_of("MODEL-RAISE")
    assert no_taps(net)
    net[1].armed = False
    assert torch.equal(model(x), net[2](net[0](x)))
    with model.trace(x):
        out = model.output
    assert torch.equal(out, net[2](net[0](x)))


# == skip ====================================================================================


def _counted_model():
    torch.manual_seed(0)
    net = CountedMLP()
    return net, mediator.Model(net)


def _hand_forward(net: CountedMLP, x: torch.Tensor, replace: dict[int, torch.Tensor]):
    h = x
    for i, layer in enumerate(net.layers):
        y = replace[i] if i in replace else nn.functional.linear(h, layer.weight, layer.bias)
        h = torch.relu(y)
    return h


def test_skip_does_not_run_the_module(x):
    net, model = _counted_model()
    torch.manual_seed(9)
    v = torch.randn(3, 8)
    expected = _hand_forward(net, x, {2: v})
    for layer in net.layers:
        layer.calls = 0
    with model.trace(x):
        model.layers[2].skip(v)
        out = model.output
    assert [layer.calls for layer in net.layers] == [1, 1, 0, 1]
    assert torch.equal(out, expected)


def test_skip_with_a_value_from_the_body(x):
    net, model = _counted_model()
    h1 = seen(net, net.layers[1], x)
    expected = _hand_forward(net, x, {2: h1 * 3})
    for layer in net.layers:
        layer.calls = 0
    with model.trace(x):
        h = model.layers[1].output
        model.layers[2].skip(h * 3)
        out = model.output
    assert [layer.calls for layer in net.layers] == [1, 1, 0, 1]
    assert torch.equal(out, expected)


def test_skipped_module_output_is_the_skip_value(x):
    net, model = _counted_model()
    torch.manual_seed(9)
    v = torch.randn(3, 8)
    with model.trace(x):
        model.layers[2].skip(v)
        o = model.layers[2].output
        out = model.output
    assert torch.equal(o, v)
    assert torch.equal(out, _hand_forward(net, x, {2: v}))


# == nested outputs ==========================================================================


def _nested():
    torch.manual_seed(0)
    net = Nested()
    return net, mediator.Model(net)


def test_read_nested_outputs(x):
    net, model = _nested()
    tup = seen(net, net.tup, x)
    dic = seen(net, net.dic, x)
    dat = seen(net, net.dat, x)
    with model.trace(x):
        t = model.tup.output
        d = model.dic.output
        o = model.dat.output
        out = model.output
    assert isinstance(t, tuple) and len(t) == 2
    assert torch.equal(t[0], tup[0]) and torch.equal(t[1], tup[1])
    assert set(d) == {"hidden", "aux"}
    assert torch.equal(d["hidden"], dic["hidden"]) and torch.equal(d["aux"], dic["aux"])
    assert isinstance(o, Out)
    assert torch.equal(o.hidden, dat.hidden) and torch.equal(o.score, dat.score)
    assert torch.equal(out, net(x))


def test_swap_nested_outputs(x):
    net, model = _nested()
    expected = hooked(
        net,
        x,
        out={
            net.tup: lambda t: (t[0] * 2, t[1]),
            net.dic: lambda d: {"hidden": d["hidden"], "aux": torch.zeros_like(d["aux"])},
            net.dat: lambda o: Out(hidden=o.hidden, score=o.score + 1),
        },
    )
    with model.trace(x):
        t = model.tup.output
        model.tup.output = (t[0] * 2, t[1])
        d = model.dic.output
        model.dic.output = {"hidden": d["hidden"], "aux": torch.zeros_like(d["aux"])}
        o = model.dat.output
        model.dat.output = Out(hidden=o.hidden, score=o.score + 1)
        out = model.output
    assert torch.equal(out, expected)
    assert not torch.equal(out, net(x))


def test_in_place_edit_inside_nested_output(x):
    net, model = _nested()

    def zero_aux(d):
        d["aux"][:, 0] = 0

    expected = hooked(net, x, out={net.dic: zero_aux})
    with model.trace(x):
        model.dic.output["aux"][:, 0] = 0
        out = model.output
    assert torch.equal(out, expected)


def test_swap_nested_output_with_wrong_structure(x):
    net, model = _nested()
    with pytest.raises(mediator.ShapeError, match="tup"):
        with model.trace(x):
            t = model.tup.output
            model.tup.output = t[0]
            model.output
    assert no_taps(net)
    assert torch.equal(model(x), net(x))


def test_trace_keeps_no_activation_alive(model, x):
    import gc
    import weakref

    with model.trace(x) as tr:
        ref = weakref.ref(model.layers[1].output)
        seen_shape = tuple(model.layers[1].output.shape)
    gc.collect()
    assert seen_shape == (3, 8)
    assert ref() is None, "an activation no user name holds is still alive (tr is kept)"
    assert tr is not None
