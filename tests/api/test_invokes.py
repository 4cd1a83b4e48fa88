"""Several invokes in one batched forward (`with model.trace() as tr: with tr.invoke(a): ...`).

Oracles are plain PyTorch: one forward of the concatenated inputs with hooks that do exactly the
same edit on exactly the same rows (exact equality), or separate forwards for cross-invoke
patching (tight tolerance: a different batch size may change the last bits of a matmul).
"""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import runpy
import textwrap
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mediator

# -- oracles ---------------------------------------------------------------------------------


def hooked(
    net: nn.Module,
    *args: Any,
    out: dict[nn.Module, Callable[[Any], Any]] | None = None,
    pre: dict[nn.Module, Callable[[tuple], Any]] | None = None,
) -> Any:
    """`net(*args)` with forward hooks `out[m](output)` and pre-hooks `pre[m](args)` (each
    returning a replacement or None), removed afterwards."""
    handles = []
    try:
        for module, fn in (out or {}).items():
            handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: fn(o)))
        for module, fn in (pre or {}).items():
            handles.append(module.register_forward_pre_hook(lambda m, a, fn=fn: fn(a)))
        return net(*args)
    finally:
        for handle in handles:
            handle.remove()


def seen(net: nn.Module, module: nn.Module, *args: Any) -> Any:
    """The output a forward hook on `module` sees in a plain run of `net(*args)`."""
    record: list[Any] = []

    def keep(o: Any) -> None:
        record.append(o)

    hooked(net, *args, out={module: keep})
    assert len(record) == 1
    return record[0]


def rows_edit(rows: slice, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A forward hook body that replaces `rows` of the output by `fn(those rows)`."""

    def edit(o: torch.Tensor) -> torch.Tensor:
        new = o.clone()
        new[rows] = fn(o[rows])
        return new

    return edit


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def line_of(marker: str) -> int:
    with open(__file__, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    hits = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, hits
    return hits[0]


def same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype)


class Counter:
    """Counts calls of a module (a forward hook, removed on exit)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls = 0
        self.batch_sizes: list[int] = []

    def __enter__(self) -> Counter:
        def hook(m: nn.Module, a: tuple, o: Any) -> None:
            self.calls += 1
            self.batch_sizes.append(int(a[0].shape[0]))

        self.handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


# -- models ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Out:
    hidden: torch.Tensor
    score: torch.Tensor


class NestedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        h = self.lin(x)
        return h, {"out": Out(hidden=h * 2, score=h.sum(-1)), "scale": 3, "bias": self.lin.bias}


class NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = NestedBlock()
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, extra = self.block(x)
        o = extra["out"]
        return self.head(h + o.hidden * o.score[:, None] * extra["scale"])


class ScaledNet(nn.Module):
    """Takes a non-tensor positional argument and a tensor keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float, *, bias: torch.Tensor) -> torch.Tensor:
        return self.lin(x * scale + bias)


# == one batched forward, rows per invoke ====================================================


def test_two_invokes_see_their_rows(model, net):
    a, b = randn(10, 2, 8), randn(11, 3, 8)
    batch = torch.cat([a, b])
    full_h = seen(net, net.layers[1], batch)
    full_out = net(batch)
    with Counter(net) as root, Counter(net.layers[1]) as layer:
        with model.trace() as tr:
            with tr.invoke(a):
                ha = model.layers[1].output
                oa = model.output
            with tr.invoke(b):
                hb = model.layers[1].output
                ob = model.output
    assert root.calls == 1 and root.batch_sizes == [5]
    assert layer.calls == 1
    assert torch.equal(ha, full_h[:2]) and torch.equal(hb, full_h[2:])
    assert torch.equal(oa, full_out[:2]) and torch.equal(ob, full_out[2:])


def test_three_invokes_inputs_and_outputs(model, net):
    a, b, c = randn(1, 1, 8), randn(2, 2, 8), randn(3, 3, 8)
    batch = torch.cat([a, b, c])
    full_h = seen(net, net.layers[2], batch)
    full_out = net(batch)
    with Counter(net) as root:
        with model.trace() as tr:
            with tr.invoke(a):
                ia = model.input
                ha = model.layers[2].output
            with tr.invoke(b):
                ib = model.input
                hb = model.layers[2].output
                ob = model.output
            with tr.invoke(c):
                ic = model.input
                hc = model.layers[2].output
                oc = model.output
    assert root.calls == 1 and root.batch_sizes == [6]
    assert torch.equal(ia, a) and torch.equal(ib, b) and torch.equal(ic, c)
    assert torch.equal(ha, full_h[0:1])
    assert torch.equal(hb, full_h[1:3])
    assert torch.equal(hc, full_h[3:6])
    assert torch.equal(ob, full_out[1:3]) and torch.equal(oc, full_out[3:6])


def test_swap_in_one_invoke_changes_only_its_rows(model, net):
    a, b, c = randn(1, 2, 8), randn(2, 3, 8), randn(3, 1, 8)
    batch = torch.cat([a, b, c])
    expected = hooked(net, batch, out={net.layers[1]: rows_edit(slice(2, 5), lambda r: r * -3)})
    assert not torch.equal(expected[2:5], net(batch)[2:5])
    with Counter(net) as root:
        with model.trace() as tr:
            with tr.invoke(a):
                oa = model.output
            with tr.invoke(b):
                h = model.layers[1].output
                model.layers[1].output = h * -3
                ob = model.output
            with tr.invoke(c):
                hc = model.layers[1].output
                oc = model.output
    assert root.calls == 1
    assert torch.equal(oa, expected[:2])
    assert torch.equal(ob, expected[2:5])
    assert torch.equal(oc, expected[5:])
    assert torch.equal(hc, seen(net, net.layers[1], batch)[5:])


def test_in_place_edit_in_one_invoke(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])

    def zero_col(o):
        o[2:, 0] = 0

    expected = hooked(net, batch, out={net.layers[1]: zero_col})
    with model.trace() as tr:
        with tr.invoke(a):
            ha = model.layers[1].output.clone()
            oa = model.output
        with tr.invoke(b):
            model.layers[1].output[:, 0] = 0
            hb = model.layers[1].output
            ob = model.output
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])
    assert torch.equal(hb[:, 0], torch.zeros(3))
    assert torch.equal(ha, seen(net, net.layers[1], batch)[:2])


def test_input_swap_in_one_invoke(model, net):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    batch = torch.cat([a, b])

    def edit(args):
        new = args[0].clone()
        new[:2] = 0
        return (new,)

    expected = hooked(net, batch, pre={net.layers[2]: edit})
    with model.trace() as tr:
        with tr.invoke(a):
            model.layers[2].input = torch.zeros(2, 8)
            oa = model.output
        with tr.invoke(b):
            ib = model.layers[2].input
            ob = model.output
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])
    assert torch.equal(ib, torch.relu(seen(net, net.layers[1], batch))[2:])


def test_nested_outputs_are_narrowed(x):
    torch.manual_seed(0)
    net = NestedNet()
    model = mediator.Model(net)
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    h_full, extra_full = seen(net, net.block, batch)

    def edit(value):
        h, extra = value
        o = extra["out"]
        hidden = o.hidden.clone()
        hidden[2:] = 0
        kept = {key: extra[key] for key in ("scale", "bias")}
        return h, {"out": Out(hidden=hidden, score=o.score), **kept}

    expected = hooked(net, batch, out={net.block: edit})
    with model.trace() as tr:
        with tr.invoke(a):
            ha, extra_a = model.block.output
            oa = model.output
        with tr.invoke(b):
            hb, extra_b = model.block.output
            model.block.output = (
                hb,
                {
                    "out": Out(hidden=torch.zeros(3, 8), score=extra_b["out"].score),
                    "scale": 3,
                    "bias": extra_b["bias"],
                },
            )
            ob = model.output
    assert torch.equal(ha, h_full[:2]) and torch.equal(hb, h_full[2:])
    assert extra_a["scale"] == extra_b["scale"] == 3
    # a tensor whose dim 0 is not the batch size is passed whole
    assert extra_a["bias"] is net.block.lin.bias and extra_b["bias"] is net.block.lin.bias
    assert torch.equal(extra_a["out"].hidden, extra_full["out"].hidden[:2])
    assert torch.equal(extra_a["out"].score, extra_full["out"].score[:2])
    assert torch.equal(extra_b["out"].score, extra_full["out"].score[2:])
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])


def test_non_tensor_args_and_tensor_kwargs_are_batched():
    torch.manual_seed(0)
    net = ScaledNet()
    model = mediator.Model(net)
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    ba, bb = randn(3, 2, 8), randn(4, 3, 8)
    expected = net(torch.cat([a, b]), 2.0, bias=torch.cat([ba, bb]))
    with model.trace() as tr:
        with tr.invoke(a, 2.0, bias=ba):
            args_a, kwargs_a = model.inputs
            oa = model.output
        with tr.invoke(b, 2.0, bias=bb):
            args_b, kwargs_b = model.lin.inputs
            ob = model.output
    assert args_a[1] == 2.0 and torch.equal(args_a[0], a) and torch.equal(kwargs_a["bias"], ba)
    assert torch.equal(args_b[0], (b * 2.0 + bb))
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])


# == the empty invoke ========================================================================


def test_empty_invoke_sees_whole_batch_with_earlier_edits(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    edit = rows_edit(slice(0, 2), lambda r: r * 2)
    expected_h = edit(seen(net, net.layers[1], batch))
    expected = hooked(net, batch, out={net.layers[1]: edit})
    with Counter(net) as root:
        with model.trace() as tr:
            with tr.invoke(a):
                model.layers[1].output = model.layers[1].output * 2
            with tr.invoke(b):
                hb = model.layers[1].output
            with tr.invoke():
                full_in = model.input
                full_h = model.layers[1].output
                full = model.output
    assert root.calls == 1 and root.batch_sizes == [5]
    assert torch.equal(full_in, batch)
    assert torch.equal(full_h, expected_h)
    assert torch.equal(full, expected)
    assert torch.equal(hb, expected_h[2:])


def test_empty_invoke_swap_reaches_every_invoke(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    expected = hooked(net, batch, out={net.layers[2]: lambda o: o + 1})
    with model.trace() as tr:
        with tr.invoke(a):
            oa = model.output
        with tr.invoke():
            model.layers[2].output = model.layers[2].output + 1
        with tr.invoke(b):
            h2b = model.layers[2].output
            ob = model.output
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])
    assert torch.equal(h2b, seen(net, net.layers[2], batch)[2:] + 1)


# == names shared between invokes ============================================================


def _patched_oracle(net, clean, corrupt, layer):
    clean_h = seen(net, layer, clean)
    return clean_h, hooked(net, corrupt, out={layer: lambda o: clean_h})


def test_cross_invoke_name_patching(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    clean_ref, expected = _patched_oracle(net, clean, corrupt, net.layers[1])
    with Counter(net) as root:
        with model.trace() as tr:
            with tr.invoke(clean):
                clean_h = model.layers[1].output
                clean_out = model.output
            with tr.invoke(corrupt):
                model.layers[1].output = clean_h  # read before any request of this invoke
                patched = model.output
    assert root.calls == 1
    assert close(clean_h, clean_ref)
    assert close(clean_out, net(clean))
    assert close(patched, expected)
    assert not close(patched, net(corrupt))


def test_cross_invoke_name_overrides_stale_enclosing_value(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    clean_ref, expected = _patched_oracle(net, clean, corrupt, net.layers[2])
    clean_h = torch.full((2, 8), 100.0)  # stale value from earlier code
    with model.trace() as tr:
        with tr.invoke(clean):
            clean_h = model.layers[2].output
        with tr.invoke(corrupt):
            model.layers[2].output = clean_h
            patched = model.output
    assert close(clean_h, clean_ref)
    assert close(patched, expected)


def test_cross_invoke_name_used_at_a_later_layer(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    clean_ref = seen(net, net.layers[1], clean)
    expected = hooked(net, corrupt, out={net.layers[3]: lambda o: o + clean_ref})
    with model.trace() as tr:
        with tr.invoke(clean):
            clean_h = model.layers[1].output
        with tr.invoke(corrupt):
            model.layers[3].output = model.layers[3].output + clean_h
            patched = model.output
    assert close(patched, expected)


def test_cross_invoke_name_bound_too_late_is_out_of_order(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    with pytest.raises(mediator.OutOfOrderError, match="layers.1"):
        with model.trace() as tr:
            with tr.invoke(clean):
                late = model.layers[3].output
            with tr.invoke(corrupt):
                model.layers[1].output = late
    assert torch.equal(model(clean), net(clean))


def test_cross_invoke_name_in_nested_scopes_of_the_reader(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    clean_ref = seen(net, net.layers[1], clean)
    with model.trace() as tr:
        with tr.invoke(clean):
            clean_h = model.layers[1].output
        with tr.invoke(corrupt):
            rows = [clean_h[i] * 2 for i in range(2)]
            add = lambda t: t + clean_h  # noqa: E731
            mine = add(model.layers[1].output)
    assert close(torch.stack(rows), clean_ref * 2)
    assert close(mine, seen(net, net.layers[1], corrupt) + clean_ref)


def test_later_invoke_binding_wins_after_the_trace(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    full_out = net(batch)
    with model.trace() as tr:
        with tr.invoke(a):
            out = model.output
            only_a = 1
        with tr.invoke(b):
            out = model.output
    assert torch.equal(out, full_out[2:])
    assert only_a == 1


def test_trivial_and_one_line_bodies(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    full_h = seen(net, net.layers[1], batch)
    # fmt: off
    with model.trace() as tr:
        with tr.invoke(a):
            pass
        with tr.invoke(b): hb = model.layers[1].output  # noqa: E701
    assert torch.equal(hb, full_h[2:])
    with model.trace() as tr:
        with tr.invoke(a): ha = model.layers[1].output  # noqa: E701
        with tr.invoke(b): hb = model.layers[1].output  # noqa: E701
    # fmt: on
    assert torch.equal(ha, full_h[:2]) and torch.equal(hb, full_h[2:])


def test_name_no_invoke_binds_is_name_error(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    with pytest.raises(NameError, match="maybe"):
        with model.trace() as tr:
            with tr.invoke(a):
                h = model.layers[0].output
                if h.shape[0] > 100:
                    maybe = h
            with tr.invoke(b):
                model.layers[1].output = maybe


def test_name_defined_nowhere_is_name_error(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    with pytest.raises(NameError, match="nowhere_defined_name"):
        with model.trace() as tr:
            with tr.invoke(a):
                h = model.layers[0].output
            with tr.invoke(b):
                model.layers[1].output = nowhere_defined_name  # noqa: F821


MODULE_SCRIPT = """
import torch
import mediator
from torch import nn

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
model = mediator.Model(net)
clean, corrupt = torch.randn(2, 4), torch.randn(2, 4)

with model.trace() as tr:
    with tr.invoke(clean):
        clean_h = model[0].output
    with tr.invoke(corrupt):
        model[0].output = clean_h
        patched = model.output

reference = net[0](clean)
handle = net[0].register_forward_hook(lambda m, a, o: reference)
expected = net(corrupt)
handle.remove()
"""


def test_cross_invoke_names_at_module_level(tmp_path):
    script = tmp_path / "module_level_invokes.py"
    script.write_text(textwrap.dedent(MODULE_SCRIPT))
    names = runpy.run_path(str(script))
    assert close(names["clean_h"], names["reference"])
    assert close(names["patched"], names["expected"])


# == barriers ================================================================================


def test_barrier_when_order_is_not_enough(model, net):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    batch = torch.cat([a, b])

    def copy_rows(o):
        new = o.clone()
        new[:2] = o[2:]
        return new

    expected = hooked(net, batch, out={net.layers[1]: copy_rows})
    box: dict[str, torch.Tensor] = {}  # shared through an object: no name to wait on
    with model.trace() as tr:
        bar = tr.barrier(2)
        with tr.invoke(a):
            own = model.layers[1].output.clone()
            bar()
            model.layers[1].output = box["h"]
            oa = model.output
        with tr.invoke(b):
            box["h"] = model.layers[1].output
            bar()
            ob = model.output
    assert torch.equal(own, seen(net, net.layers[1], batch)[:2])
    assert torch.equal(oa, expected[:2]) and torch.equal(ob, expected[2:])


def test_barrier_reached_by_one_body_only_is_an_error(model):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    with pytest.raises(mediator.MediatorError, match="barrier"):
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(a):
                model.layers[1].output
                bar()
            with tr.invoke(b):
                model.layers[1].output


def test_barrier_needs_positive_parties(model):
    with model.trace() as tr:
        with pytest.raises(ValueError):
            tr.barrier(0)
        with tr.invoke(randn(1, 2, 8)):
            out = model.output
    assert out.shape == (2, 8)


# == the function form =======================================================================


def test_function_invoke_returns_future(model, net, x):
    def ablate(layer, *, scale):
        h = model.layers[layer].output
        model.layers[layer].output = h * scale
        return model.output

    expected = hooked(net, x, out={net.layers[1]: lambda o: o * 0.0})
    with model.trace() as tr:
        fut = tr.invoke(x).run(ablate, 1, scale=0.0)
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.done()
    assert torch.equal(fut.result(), expected)


def test_function_invokes_with_different_rows(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])

    def ablate(layer):
        model.layers[layer].output = torch.zeros_like(model.layers[layer].output)
        return model.output

    expected = hooked(
        net,
        batch,
        out={
            net.layers[0]: rows_edit(slice(0, 2), torch.zeros_like),
            net.layers[1]: rows_edit(slice(2, 5), torch.zeros_like),
        },
    )
    with Counter(net) as root:
        with model.trace() as tr:
            fa = tr.invoke(a).run(ablate, 0)
            fb = tr.invoke(b).run(ablate, 1)
    assert root.calls == 1
    assert torch.equal(fa.result(), expected[:2])
    assert torch.equal(fb.result(), expected[2:])


def test_function_invoke_lambda(model, net, x):
    with model.trace() as tr:
        fut = tr.invoke(x).run(lambda: model.layers[2].output * 1)
    assert torch.equal(fut.result(), seen(net, net.layers[2], x))


def test_function_defined_by_exec_has_no_source_and_works(model, net, x):
    namespace: dict[str, Any] = {"model": model}
    exec(
        compile(
            "def fn(k):\n"
            "    h = model.layers[k].output\n"
            "    model.layers[k].output = h + 1\n"
            "    return model.output\n",
            "<no source here>",
            "exec",
        ),
        namespace,
    )
    expected = hooked(net, x, out={net.layers[2]: lambda o: o + 1})
    with model.trace() as tr:
        fut = tr.invoke(x).run(namespace["fn"], 2)
    assert torch.equal(fut.result(), expected)


def test_mixing_with_invoke_and_function_invoke(model, net):
    clean, corrupt = randn(1, 2, 8), randn(2, 2, 8)
    batch = torch.cat([clean, corrupt])

    def fn():
        model.layers[1].output = model.layers[1].output * 2
        return model.output

    expected = hooked(net, batch, out={net.layers[1]: rows_edit(slice(2, 4), lambda r: r * 2)})
    with Counter(net) as root:
        with model.trace() as tr:
            with tr.invoke(clean):
                h = model.layers[1].output
                oa = model.output
            fut = tr.invoke(corrupt).run(fn)
    assert root.calls == 1
    assert torch.equal(h, seen(net, net.layers[1], batch)[:2])
    assert torch.equal(oa, expected[:2])
    assert torch.equal(fut.result(), expected[2:])


def test_function_that_raises(model, net, x):
    def bad():
        model.layers[0].output
        raise LookupError("inside the function")  # FN-RAISE

    with pytest.raises(LookupError, match="inside the function") as info:
        with model.trace() as tr:
            fut = tr.invoke(x).run(bad)
    assert fut.done()
    assert fut.exception() is info.value
    with pytest.raises(LookupError):
        fut.result()
    frames = traceback.extract_tb(info.value.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("FN-RAISE")
    assert torch.equal(model(x), net(x))


def test_result_inside_trace_block_is_usage_error(model, net, x):
    with model.trace() as tr:
        fut = tr.invoke(x).run(lambda: model.output)
        with pytest.raises(mediator.UsageError):
            fut.result()
    assert torch.equal(fut.result(), net(x))


def test_result_inside_a_running_body_does_not_hang(net):
    model = mediator.Model(net)
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    state: dict[str, Any] = {}

    def first():
        return model.layers[0].output

    def second():
        model.layers[2].output
        return state["first"].result()

    def run_trace():
        try:
            with model.trace() as tr:
                state["first"] = tr.invoke(a).run(first)
                state["second"] = tr.invoke(b).run(second)
        except BaseException as error:  # noqa: BLE001
            state["error"] = error

    thread = threading.Thread(target=run_trace, daemon=True)
    thread.start()
    thread.join(timeout=1.0)
    hung = thread.is_alive()
    if hung:  # unstick the deadlocked body so the trace (and the test run) can end
        state["first"].set_result(None)
        thread.join(timeout=5.0)
    assert not hung, "fut.result() inside a running body deadlocked the trace"
    assert isinstance(state.get("error"), mediator.UsageError)


def test_run_needs_a_callable(model, x):
    with model.trace() as tr:
        with pytest.raises(TypeError, match="callable"):
            tr.invoke(x).run(42)
        with tr.invoke(x):
            out = model.output
    assert out.shape == (3, 8)


# == source, nesting and batching errors =====================================================


def test_with_block_without_source(model, x):
    code = compile(
        "with model.trace(x):\n    h = model.layers[0].output\n", "<no source 1>", "exec"
    )
    with pytest.raises(mediator.SourceUnavailableError) as info:
        exec(code, {"model": model, "x": x})
    message = str(info.value)
    assert "function form" in message and ".run(" in message
    assert isinstance(info.value, mediator.UsageError)


def test_invoke_with_block_without_source(model, x):
    code = compile(
        "with model.trace() as tr:\n    with tr.invoke(x):\n        h = model.layers[0].output\n",
        "<no source 2>",
        "exec",
    )
    with pytest.raises(mediator.SourceUnavailableError, match="function form"):
        exec(code, {"model": model, "x": x})


def test_invoke_inside_invoke_is_usage_error(model, x):
    with pytest.raises(mediator.UsageError):
        with model.trace() as tr:
            with tr.invoke(x):
                with tr.invoke(x):
                    model.output


def test_invoke_inside_a_function_invoke_is_usage_error(model, net, x):
    def nested():
        tr.invoke(x).run(lambda: None)

    with pytest.raises(mediator.UsageError) as info:
        with model.trace() as tr:
            fut = tr.invoke(x).run(nested)
    assert fut.exception() is info.value
    assert torch.equal(model(x), net(x))


def test_invoke_after_trace_ran_is_usage_error(model, x):
    with model.trace() as tr:
        with tr.invoke(x):
            out = model.output
    with pytest.raises(mediator.UsageError):
        with tr.invoke(x):
            model.output


def test_trailing_shape_mismatch_is_shape_error(model, net):
    with pytest.raises(mediator.ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(randn(1, 2, 8)):
                model.output
            with tr.invoke(randn(2, 2, 4)):
                model.output
    message = str(info.value)
    assert "input 0" in message
    assert "[2, 8]" in message and "[2, 4]" in message


def test_dtype_mismatch_is_shape_error(model):
    with pytest.raises(mediator.ShapeError, match="input 0") as info:
        with model.trace() as tr:
            with tr.invoke(randn(1, 2, 8)):
                model.output
            with tr.invoke(randn(2, 2, 8, dtype=torch.float64)):
                model.output
    assert "float64" in str(info.value)


def test_non_tensor_argument_mismatch_is_shape_error():
    torch.manual_seed(0)
    model = mediator.Model(ScaledNet())
    with pytest.raises(mediator.ShapeError, match="input 1"):
        with model.trace() as tr:
            with tr.invoke(randn(1, 2, 8), 1.0, bias=randn(2, 2, 8)):
                model.output
            with tr.invoke(randn(3, 2, 8), 2.0, bias=randn(4, 2, 8)):
                model.output


def test_swap_wrong_shape_in_one_invoke_names_its_rows(model):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    with pytest.raises(mediator.ShapeError) as info:
        with model.trace() as tr:
            with tr.invoke(a):
                model.layers[1].output = torch.zeros(5, 8)  # the whole batch: wrong
            with tr.invoke(b):
                model.output
    assert "layers.1" in str(info.value) and "[2, 8]" in str(info.value)


def test_no_inputs_anywhere_is_usage_error(model, net, x):
    with pytest.raises(mediator.UsageError):
        with model.trace() as tr:
            with tr.invoke():
                model.output
            with tr.invoke():
                model.layers[0].output
    with pytest.raises(mediator.UsageError):
        with model.trace() as tr:
            tr.invoke().run(lambda: model.output)
    assert torch.equal(model(x), net(x))


def test_error_in_second_invoke_keeps_type_and_line(model, net):
    a, b = randn(1, 2, 8), randn(2, 2, 8)
    with pytest.raises(IndexError) as info:
        with model.trace() as tr:
            with tr.invoke(a):
                ha = model.layers[0].output
            with tr.invoke(b):
                hb = model.layers[1].output
                hb[7, 0]  # SECOND-INVOKE-INDEX
    frames = traceback.extract_tb(info.value.__traceback__)
    assert same_file(frames[-1].filename, __file__)
    assert frames[-1].lineno == line_of("SECOND-INVOKE-INDEX")
    assert torch.equal(model(a), net(a))


# == gradients ===============================================================================


def _grad_oracle(net, batch, rows):
    """h.grad (layer 1 output, those rows) and layer 0's weight grad when the loss is the
    sum of `rows` of the output, from one batched forward with a hook."""
    record = {}

    def keep(o):
        o.retain_grad()
        record["h"] = o

    net.zero_grad()
    out = hooked(net, batch, out={net.layers[1]: keep})
    out[rows].sum().backward()
    grad_h = record["h"].grad[rows].clone()
    grad_w = net.layers[0].weight.grad.clone()
    net.zero_grad()
    return grad_h, grad_w


def test_trace_with_invokes_keeps_no_activation_alive(model):
    import gc
    import weakref

    a, b = randn(1, 2, 8), randn(2, 3, 8)
    with model.trace() as tr:
        with tr.invoke(a):
            ref_a = weakref.ref(model.layers[1].output)
        fut = tr.invoke(b).run(lambda: weakref.ref(model.layers[2].output))
    gc.collect()
    assert ref_a() is None
    assert fut.result()() is None
    assert tr is not None


def test_gradient_for_one_invoke_among_several(model, net):
    a, b, c = randn(1, 2, 8), randn(2, 3, 8), randn(3, 1, 8)
    batch = torch.cat([a, b, c])
    grad_h, grad_w = _grad_oracle(net, batch, slice(2, 5))
    with model.trace() as tr:
        with tr.invoke(a):
            ha = model.layers[1].output
        with tr.invoke(b):
            h = model.layers[1].output
            h.retain_grad()
            model.output.sum().backward()
        with tr.invoke(c):
            oc = model.output
    assert h.grad is not None
    assert close(h.grad, grad_h)
    assert close(net.layers[0].weight.grad, grad_w)


def test_gradient_after_the_trace_using_a_name(model, net):
    a, b = randn(1, 2, 8), randn(2, 3, 8)
    batch = torch.cat([a, b])
    grad_h, grad_w = _grad_oracle(net, batch, slice(0, 2))
    with model.trace() as tr:
        with tr.invoke(a):
            h = model.layers[1].output
            h.retain_grad()
            loss = model.output.sum()
        with tr.invoke(b):
            ob = model.output
    loss.backward()
    assert h.grad is not None
    assert close(h.grad, grad_h)
    assert close(net.layers[0].weight.grad, grad_w)
