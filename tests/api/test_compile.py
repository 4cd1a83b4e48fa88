"""`torch.compile`d models: traces run them eagerly, plain calls run the compiled graph again.

Oracles: `Block` adds 1 to its output only when dynamo compiles it (`is_compiling()` is True
while dynamo traces and is baked into the graph), so an output tells whether the compiled graph
ran; a counting backend counts compilations and runs of the graph; values read and written in
traces are compared with forward hooks on an eager twin of the model (same weights). Dynamo's
caches are reset around each test so that no test sees another's compilations.
"""

# ruff: noqa: B018, F841

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from conftest import assert_untouched
from torch import nn

import mediator

WIDTH = 4


class Block(nn.Module):
    """relu(Linear(x)), plus 1 when it runs as compiled code."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.lin(x))
        if torch.compiler.is_compiling():
            h = h + 1
        return h


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Counting:
    """A dynamo backend that runs the captured graph as it is and counts compiles and runs."""

    def __init__(self) -> None:
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
        self.compiles += 1
        forward = gm.forward

        def run(*args: Any) -> Any:
            self.runs += 1
            return forward(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def twin(net: Net) -> Net:
    """An eager copy of `net` with the same weights."""
    copy = Net()
    copy.load_state_dict(net.state_dict())
    return copy


def hooked(net: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle of `patch`: layers.1's output, and the model's output with it doubled."""
    seen = []

    def double(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        seen.append(output.detach().clone())
        return output * 2

    handle = net.layers[1].register_forward_hook(double)
    try:
        out = net(x)
    finally:
        handle.remove()
    return seen[0], out


def patch(model: mediator.Model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A trace that reads layers.1's output and doubles it: (what it read, the output)."""
    with model.trace(x):
        h = model.layers[1].output.clone()
        model.layers[1].output = model.layers[1].output * 2
        out = model.output
    return h, out


def compiled_in_place(backend: Any) -> tuple[Net, mediator.Model, Callable[..., Any]]:
    net = Net()
    net.compile(backend=backend)
    return net, mediator.Model(net), net


def compiled_beside(backend: Any) -> tuple[Net, mediator.Model, Callable[..., Any]]:
    net = Net()
    return net, mediator.Model(net), torch.compile(net, backend=backend)


def compiled_inside(backend: Any) -> tuple[Net, mediator.Model, Callable[..., Any]]:
    net = Net()
    model = mediator.Model(torch.compile(net, backend=backend))
    return net, model, model


#: How the user compiled: (the module, its Model, what the user calls for a plain call).
Form = Callable[[Any], tuple[Net, mediator.Model, Callable[..., Any]]]
FORMS = [compiled_in_place, compiled_beside, compiled_inside]


def graph_output(eager: Net, x: torch.Tensor) -> torch.Tensor:
    """What the compiled graph computes: each block's eager output plus 1."""
    h = x
    for layer in eager.layers:
        h = torch.relu(layer.lin(h)) + 1
    return h


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", ["counting", "eager"])
def test_traces_run_eagerly_and_plain_calls_run_the_graph_again(form: Form, backend: str) -> None:
    counting = Counting()
    net, model, plain = form(counting if backend == "counting" else backend)
    eager = twin(net)
    x = torch.randn(2, WIDTH)
    torch.testing.assert_close(plain(x), graph_output(eager, x))
    own_call = net.__dict__.get("_compiled_call_impl")
    runs = counting.runs

    h, out = patch(model, x)

    oracle_h, oracle_out = hooked(eager, x)
    torch.testing.assert_close(h, oracle_h)  # no block ran as compiled code in the trace
    torch.testing.assert_close(out, oracle_out)
    torch.testing.assert_close(plain(x), graph_output(eager, x))
    if backend == "counting":
        assert counting.compiles == 1, "the trace made dynamo compile the model again"
        assert counting.runs == runs + 1
    assert net.__dict__.get("_compiled_call_impl") is own_call
    assert_untouched(net)


@pytest.mark.parametrize("form", FORMS)
def test_a_body_that_calls_the_compiled_model_gets_the_graph(
    form: Form,
) -> None:
    counting = Counting()
    net, model, plain = form(counting)
    eager = twin(net)
    x = torch.randn(2, WIDTH)
    plain(x)
    for _ in range(3):
        with model.trace(x):
            h = model.layers[0].output.clone()
            inside = plain(x)  # another thread than the model's: compiled, not intercepted
        torch.testing.assert_close(h, eager.layers[0](x))
        torch.testing.assert_close(inside, graph_output(eager, x))
    compiles = counting.compiles
    runs = counting.runs
    torch.testing.assert_close(plain(x), graph_output(eager, x))
    assert counting.runs == runs + 1
    assert compiles <= 2, "each trace made dynamo compile the model again"
    assert counting.compiles == compiles
    assert_untouched(net)


@pytest.mark.parametrize("form", FORMS)
def test_many_traces_do_not_recompile(
    form: Form,
    caplog: pytest.LogCaptureFixture,
) -> None:
    counting = Counting()
    net, model, plain = form(counting)
    eager = twin(net)
    x = torch.randn(2, WIDTH)
    plain(x)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        for index in range(20):
            y = x + index
            h, out = patch(model, y)
            oracle_h, oracle_out = hooked(eager, y)
            torch.testing.assert_close(h, oracle_h)
            torch.testing.assert_close(out, oracle_out)
    assert counting.compiles == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    torch.testing.assert_close(plain(x), graph_output(eager, x))
    assert counting.runs == 2


def test_a_submodule_compiled_in_place_is_traced_eagerly() -> None:
    counting = Counting()
    net = Net()
    net.layers[1].compile(backend=counting)
    eager = twin(net)
    model = mediator.Model(net)
    x = torch.randn(2, WIDTH)
    net(x)

    h, out = patch(model, x)

    oracle_h, oracle_out = hooked(eager, x)
    torch.testing.assert_close(h, oracle_h)
    torch.testing.assert_close(out, oracle_out)
    h1 = torch.relu(eager.layers[1].lin(eager.layers[0](x))) + 1
    torch.testing.assert_close(net(x), eager.layers[2](h1))
    assert (counting.compiles, counting.runs) == (1, 2)
    assert_untouched(net)


def test_model_of_a_compile_wrapper_has_the_paths_of_the_module() -> None:
    net = Net()
    model = mediator.Model(torch.compile(net, backend="eager"))
    assert model._traced.paths == mediator.Model(net)._traced.paths
    assert [layer.path for layer in model.layers] == ["layers.0", "layers.1", "layers.2"]
    with pytest.raises(AttributeError, match="'layers'"):
        model.layer
    x = torch.randn(2, WIDTH)
    with model.trace(x) as tr:
        cache = tr.cache()
    assert set(cache) == {"", *(f"layers.{i}{lin}" for i in range(3) for lin in ("", ".lin"))}
    torch.testing.assert_close(cache["layers.2"][0], twin(net)(x))
    torch.testing.assert_close(tr.result, twin(net)(x))


def test_import_and_plain_traces_leave_dynamo_unloaded(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys, torch, mediator\n"
        "from torch import nn\n"
        "model = mediator.Model(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))\n"
        "with model.trace(torch.ones(1, 2)):\n"
        "    h = model[0].output\n"
        "assert 'torch._dynamo' not in sys.modules, 'mediator loaded torch._dynamo'\n"
    )
    subprocess.run([sys.executable, str(script)], check=True)
