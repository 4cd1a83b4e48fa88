"""Models spread over devices: accelerate's dispatch hooks, and written values that take the
device and dtype of what they replace.

On a CPU-only machine the dispatched models keep some layers on "cpu" and offload others to
"disk" (accelerate loads their weights before each call and drops them after), or keep every
weight on the meta device with `cpu_offload`. Oracles: plain forward hooks on the same dispatched
model, the same hooks on the undispatched model (the same weights), and solo runs. The tests at
the end need CUDA and skip without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLP, assert_untouched, tiny_gpt2, tiny_llama
from torch import nn

import mediator
from mediator import ShapeError

accelerate = pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

#: Embeddings, layer 0 and the final norm stay on the CPU; layer 1 and the head go to disk.
DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "lm_head": "disk",
}
NEW = 4  # tokens generated


def llama() -> nn.Module:
    return tiny_llama(7, pad_token_id=0)


def prompt(rows: int = 2, length: int = 5, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(1, 100, (rows, length))


@pytest.fixture(params=["disk", "cpu_offload"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[nn.Module, nn.Module]]:
    """(the undispatched model, the same weights dispatched by accelerate)."""
    plain, net = llama(), llama()
    if request.param == "disk":
        accelerate.dispatch_model(net, DEVICE_MAP, offload_dir=str(tmp_path))
    else:  # every weight on the meta device, loaded from a CPU copy around each call
        accelerate.cpu_offload(net, execution_device=torch.device("cpu"))
    state = dispatch_state(net)
    yield plain, net
    assert dispatch_state(net) == state, "accelerate's hooks or weights were changed"


def dispatch_state(net: nn.Module) -> dict[str, Any]:
    """What accelerate installed on each module (by identity), and where each weight lives."""
    state: dict[str, Any] = {}
    for path, module in net.named_modules():
        attributes = module.__dict__
        state[path] = tuple(
            id(attributes.get(name)) for name in ("forward", "_hf_hook", "_old_forward")
        )
    for name, tensor in net.state_dict(keep_vars=True).items():
        state[name] = tensor.device
    return state


def hooked(
    net: nn.Module, hooks: dict[nn.Module, Callable[..., Any]], call: Callable[[], Any]
) -> Any:
    """`call()` with `hooks[m](module, args, output)` as forward hooks (a function marked by
    `pre` is a pre-hook `fn(module, args)` instead), removed afterwards."""
    handles = []
    try:
        for module, hook in hooks.items():
            if getattr(hook, "pre", False):
                handles.append(module.register_forward_pre_hook(hook))
            else:
                handles.append(module.register_forward_hook(hook))
        return call()
    finally:
        for handle in handles:
            handle.remove()


def pre(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn.pre = True  # type: ignore[attr-defined]
    return fn


def record(into: list[Any]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        into.append(output.detach().clone())

    return hook


# -- accelerate's wrapper stays in charge --------------------------------------------------------


def test_a_trace_calls_through_accelerates_hooks_and_restores_them(pair, monkeypatch) -> None:
    """Every module's AlignDevicesHook runs once per call in a trace, as in a plain call; the
    disk-offloaded layer is read and written with its weights loaded; afterwards the wrapper,
    `_hf_hook` and `_old_forward` are the same objects and the weights are offloaded again
    (checked by the fixture)."""
    plain, net = pair
    ids = prompt()
    counts: dict[str, int] = {}
    for path, module in net.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            monkeypatch.setattr(hook, "pre_forward", counted(counts, path, hook.pre_forward))
    expected = net(ids).logits
    plain_counts = dict(counts)
    counts.clear()
    reads: list[Any] = []
    oracle = hooked(
        net,
        {net.model.layers[1].mlp: record(reads), net.model.layers[1]: doubled},
        lambda: net(ids).logits,
    )
    counts.clear()
    model = mediator.Model(net)
    with torch.no_grad(), model.trace(ids):
        h = model.model.layers[1].mlp.output
        model.model.layers[1].output = model.model.layers[1].output * 2
        logits = model.output.logits
    assert counts == plain_counts and counts  # every hook ran, once per call, as outside
    assert torch.equal(h, reads[0])
    assert torch.equal(logits, oracle)
    assert torch.equal(net(ids).logits, expected)
    assert torch.equal(expected, plain(ids).logits)


def test_a_failed_trace_leaves_accelerates_hooks_and_weights_as_they_were(pair) -> None:
    """A write of the wrong shape at the offloaded layer ends the trace with `ShapeError`; the
    fixture checks the hooks and where each weight lives, this test the plain call."""
    plain, net = pair
    ids = prompt()
    model = mediator.Model(net)
    with pytest.raises(ShapeError, match=r"model\.layers\.1\.mlp\.output"):
        with torch.no_grad(), model.trace(ids):
            model.model.layers[1].mlp.output = torch.zeros(2, 5, 7)
    with torch.no_grad():
        assert torch.equal(net(ids).logits, plain(ids).logits)


def counted(counts: dict[str, int], path: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[path] = counts.get(path, 0) + 1
        return method(*args, **kwargs)

    return wrapper


def doubled(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * 2


def test_a_model_wrapped_before_dispatch_traces_through_the_hooks(tmp_path: Path) -> None:
    """`Model(net)` then `dispatch_model(net, ...)` (accelerate replaces `forward` after the
    Model has met the module): the trace still goes through accelerate's wrapper, and leaves it
    in place."""
    plain, net = llama(), llama()
    model = mediator.Model(net)
    ids = prompt()
    with torch.no_grad(), model.trace(ids):  # before dispatch: the modules' own forwards
        first = model.model.layers[1].output
    accelerate.dispatch_model(net, DEVICE_MAP, offload_dir=str(tmp_path))
    state = dispatch_state(net)
    with torch.no_grad(), model.trace(ids):
        second = model.model.layers[1].output
        model.model.layers[1].output = second * 2
        logits = model.output.logits
    assert dispatch_state(net) == state
    reads: list[Any] = []
    with torch.no_grad():
        oracle = hooked(
            plain,
            {plain.model.layers[1]: lambda m, a, o: (reads.append(o), o * 2)[1]},
            lambda: plain(ids).logits,
        )
    assert torch.equal(first, reads[0]) and torch.equal(second, reads[0])
    assert torch.equal(logits, oracle)
    assert net.model.layers[1].mlp.down_proj.weight.device.type == "meta"


# -- reads and writes under offload ---------------------------------------------------------------


def edits_by_hooks(net: nn.Module, ids: torch.Tensor, v: torch.Tensor) -> tuple[list[Any], Any]:
    """The edits of `test_reads_and_writes_...` made with plain hooks: (reads, logits)."""
    reads: list[Any] = []
    layers = net.model.layers

    def halve_attention(module: nn.Module, args: Any, output: tuple[Any, Any]) -> Any:
        return (output[0] * 0.5, output[1])

    def shift_input(module: nn.Module, args: tuple[Any, ...]) -> Any:
        reads.append(args[0].clone())
        return (args[0] + 1, *args[1:])

    def zero_last(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, -1] = 0
        return output

    hooks = {
        layers[0].self_attn: halve_attention,
        layers[1].mlp: pre(shift_input),
        layers[1].self_attn.o_proj: lambda m, a, o: v,
        layers[1]: record(reads),
        net.model.norm: zero_last,
    }
    with torch.no_grad():
        logits = hooked(net, hooks, lambda: net(ids).logits)
    return reads, logits


def test_reads_and_writes_under_offload_equal_hooks_and_the_undispatched_model(pair) -> None:
    """A nested swap (the attention's `(output, weights)`), an input write and a skip on the
    offloaded layer, a read of its output, an in-place edit of the norm: the same values as
    hooks on the dispatched model and on the undispatched one."""
    plain, net = pair
    ids = prompt()
    v = torch.randn(2, 5, 32)
    model = mediator.Model(net)
    layers = model.model.layers
    with torch.no_grad(), model.trace(ids):
        attention, weights = layers[0].self_attn.output
        layers[0].self_attn.output = (attention * 0.5, weights)
        layers[1].self_attn.o_proj.skip(v)
        read_input = layers[1].mlp.input
        layers[1].mlp.input = read_input + 1
        h = layers[1].output
        model.model.norm.output[:, -1] = 0
        logits = model.output.logits
    for oracle_net in (net, plain):
        reads, oracle = edits_by_hooks(oracle_net, ids, v)
        assert torch.equal(read_input, reads[0])
        assert torch.equal(h, reads[1])
        assert torch.equal(logits, oracle)
    assert weights is None


def test_several_invokes_under_a_device_map_each_get_their_solo_results(pair) -> None:
    """Prompts of different lengths (padded on the left by the library), each invoke steering
    layer 0 and reading the offloaded layer 1: batching stays invisible."""
    _, net = pair
    model = mediator.Model(net)
    prompts = [prompt(2, 5, seed=1), prompt(1, 3, seed=2), prompt(1, 4, seed=3)]
    steers = [torch.randn(32) for _ in prompts]

    def experiment(ids: torch.Tensor, steer: torch.Tensor) -> tuple[Any, Any]:
        model.model.layers[0].output[:, -1] += steer
        return model.model.layers[1].output, model.output.logits

    with torch.no_grad(), model.trace() as tr:
        batched = [
            tr.invoke(ids).run(experiment, ids, s) for ids, s in zip(prompts, steers, strict=True)
        ]
    for ids, steer, future in zip(prompts, steers, batched, strict=True):
        with torch.no_grad(), model.trace() as tr:
            solo = tr.invoke(ids).run(experiment, ids, steer)
        for got, expected in zip(future.result(), solo.result(), strict=True):
            torch.testing.assert_close(got[:, -ids.shape[1] :], expected)  # left padding cut


def test_generate_under_disk_offload_equals_hf_generate_with_hooks(tmp_path: Path) -> None:
    """`generate` with a device_map: a steering edit at every step and per-step reads of the
    offloaded layer equal HF `generate` with hooks, dispatched and not."""
    plain, net = llama(), llama()
    accelerate.dispatch_model(net, DEVICE_MAP, offload_dir=str(tmp_path))
    ids, steer = prompt(1, 5), torch.randn(32)
    model = mediator.Model(net)
    with torch.no_grad(), model.generate(ids, max_new_tokens=NEW, do_sample=False) as tr:
        reads = []
        for _ in tr.iter[:]:
            model.model.layers[0].output[:, -1] += steer
            reads.append(model.model.layers[1].output)
    for oracle_net in (net, plain):
        expected: list[Any] = []

        def steered(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, -1] += steer
            return output

        hooks = {oracle_net.model.layers[0]: steered, oracle_net.model.layers[1]: record(expected)}
        with torch.no_grad():
            tokens = hooked(
                oracle_net,
                hooks,
                lambda n=oracle_net: n.generate(ids, max_new_tokens=NEW, do_sample=False),
            )
        assert torch.equal(tr.result, tokens)
        assert len(reads) == len(expected) == NEW
        for got, want in zip(reads, expected, strict=True):
            assert torch.equal(got, want)


def test_a_model_loaded_with_a_device_map_and_an_offload_folder(tmp_path: Path) -> None:
    """`from_pretrained(path, device_map=..., offload_folder=...)` of a saved GPT-2 (tied
    embeddings): reads and a write equal hooks on the model as it was saved."""
    saved = tiny_gpt2(5)
    saved.save_pretrained(tmp_path / "model")
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    net = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert net.transformer.h[1].mlp.c_fc.weight.device.type == "meta"
    ids = prompt(2, 6)
    model = mediator.Model(net)
    with torch.no_grad(), model.trace(ids):
        h = model.transformer.h[1].mlp.output
        model.transformer.h[1].mlp.output = h * 3
        logits = model.output.logits
    reads: list[Any] = []
    with torch.no_grad():
        oracle = hooked(
            saved,
            {saved.transformer.h[1].mlp: lambda m, a, o: (reads.append(o), o * 3)[1]},
            lambda: saved(ids).logits,
        )
    torch.testing.assert_close(h, reads[0])
    torch.testing.assert_close(logits, oracle)


# -- written values take the dtype (and device) they replace -------------------------------------


@pytest.fixture
def half_net() -> Iterator[MLP]:
    torch.manual_seed(0)
    net = MLP().to(torch.bfloat16)
    yield net
    assert_untouched(net)


WRITES: dict[str, Callable[[mediator.Model, torch.Tensor], None]] = {
    "output": lambda model, v: setattr(model.layers[1], "output", v),
    "input": lambda model, v: setattr(model.layers[2], "input", v),
    "inputs": lambda model, v: setattr(model.layers[2], "inputs", ((v,), {})),
    "skip": lambda model, v: model.layers[1].skip(v),
}


def replaced_by_hook(net: MLP, how: str, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The plain-hook version of `WRITES[how]` with `v` already in the model's dtype."""
    if how in ("input", "inputs"):
        return hooked(net, {net.layers[2]: pre(lambda m, a: (v,))}, lambda: net(x))
    return hooked(net, {net.layers[1]: lambda m, a, o: v}, lambda: net(x))


@pytest.mark.parametrize("how", WRITES)
def test_a_float32_write_over_a_bfloat16_value_becomes_bfloat16(half_net: MLP, how: str) -> None:
    """Also for the rows of one invoke of two (a skip there runs the module for the other), and
    gradients reach the float32 value through the cast."""
    model = mediator.Model(half_net)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    v = torch.randn(3, 8, requires_grad=True)
    with model.trace(x):
        WRITES[how](model, v)
        out = model.output
    assert out.dtype == torch.bfloat16
    v_half = v.detach().bfloat16().requires_grad_()
    expected = replaced_by_hook(half_net, how, v_half, x)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    expected.float().sum().backward()
    assert v.grad is not None and v_half.grad is not None
    assert torch.equal(v.grad, v_half.grad.float())
    with model.trace() as tr:
        with tr.invoke(x[:1]):
            first = model.output
        with tr.invoke(x[1:]):
            WRITES[how](model, v.detach()[1:])
            second = model.output
    assert torch.equal(first, half_net(x[:1]))
    assert torch.equal(second, replaced_by_hook(half_net, how, v_half.detach()[1:], x[1:]))


def test_a_value_read_back_after_a_write_has_the_replaced_dtype(half_net: MLP) -> None:
    """A value that already matches is kept as it is (the same object: no copy)."""
    model = mediator.Model(half_net)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    same = torch.randn(3, 8, dtype=torch.bfloat16)
    with model.trace(x):
        model.layers[0].output = torch.ones(3, 8, dtype=torch.long)  # an integer into a float
        cast = model.layers[0].output
        model.layers[1].output = same
        kept = model.layers[1].output
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, torch.ones(3, 8).bfloat16())
    assert kept is same


class Tokens(nn.Module):
    """Linear, then the argmax token of each row (an int64 output)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pick = Argmax()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(self.proj(x))


class Argmax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


@pytest.mark.parametrize(
    ("module", "value", "kinds"),
    [
        ("pick", torch.tensor([1.5, 2.5, 3.5]), ("float32", "int64")),
        ("proj", torch.zeros(3, 8, dtype=torch.complex64), ("complex64", "float32")),
    ],
)
def test_a_write_that_cannot_be_cast_without_loss_is_a_shape_error(
    module: str, value: torch.Tensor, kinds: tuple[str, str]
) -> None:
    torch.manual_seed(0)
    net = Tokens()
    model = mediator.Model(net)
    x = torch.randn(3, 8)
    with pytest.raises(ShapeError) as info:
        with model.trace(x):
            getattr(model, module).output = value
    message = str(info.value)
    assert f"{module}.output (call 0) at {__file__}:" in message
    assert all(kind in message for kind in kinds)
    assert "v.to(" in message  # what to write instead
    assert_untouched(net)
    assert torch.equal(model(x), net(x))


def test_an_integer_write_over_an_integer_output_is_kept() -> None:
    torch.manual_seed(0)
    net = Tokens()
    model = mediator.Model(net)
    x = torch.randn(3, 8)
    tokens = torch.tensor([4, 5, 6], dtype=torch.int32)
    with model.trace(x):
        model.pick.output = tokens
        out = model.output
    assert out.dtype == torch.int64 and torch.equal(out, tokens.long())


# -- on GPUs ---------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
#: GPU kernels against the CPU oracle: equal up to float32 rounding.
gpu_close = functools.partial(torch.testing.assert_close, atol=1e-4, rtol=1e-4)


@cuda
def test_a_cpu_value_written_over_a_cuda_output_moves_to_cuda() -> None:
    torch.manual_seed(0)
    net = MLP().cuda()
    model = mediator.Model(net)
    x = torch.randn(3, 8, device="cuda")
    v = torch.randn(3, 8)  # on the CPU
    with model.trace(x):
        h = model.layers[0].output
        model.layers[1].output = v
        moved = model.layers[1].output
        out = model.output
    assert h.device.type == "cuda" and moved.device.type == "cuda"
    assert torch.equal(out, hooked(net, {net.layers[1]: lambda m, a, o: v.cuda()}, lambda: net(x)))


@cuda
def test_cuda_and_cpu_layers_each_give_values_on_their_own_device() -> None:
    """Layer 0 on the GPU, layer 1 on the CPU (accelerate moves each module's inputs): reads
    come on the device the layer made them on; a CUDA value written over the CPU layer's output
    moves to the CPU, a CPU one over a CUDA output to the GPU; batched invokes equal solo runs."""
    plain, net = llama(), llama()
    device_map = {**DEVICE_MAP, "model.layers.1": "cpu", "lm_head": 0, "model.layers.0": 0}
    accelerate.dispatch_model(net, device_map, main_device="cpu")
    model = mediator.Model(net)
    ids = prompt()
    v0, v1 = torch.randn(2, 5, 32), torch.randn(2, 5, 32, device="cuda")
    with torch.no_grad(), model.trace(ids):
        h0 = model.model.layers[0].output
        model.model.layers[0].output = v0
        h1 = model.model.layers[1].output
        model.model.layers[1].output = v1
        logits = model.output.logits
    assert h0.device.type == "cuda" and h1.device.type == "cpu"
    reads: list[Any] = []
    with torch.no_grad():
        hooks = {
            plain.model.layers[0]: lambda m, a, o: (reads.append(o), v0)[1],
            plain.model.layers[1]: lambda m, a, o: (reads.append(o), v1.cpu())[1],
        }
        oracle = hooked(plain, hooks, lambda: plain(ids).logits)
    gpu_close(h0.cpu(), reads[0])
    gpu_close(h1, reads[1])
    gpu_close(logits.cpu(), oracle)

    def write_layer_1(value: torch.Tensor) -> torch.Tensor:
        model.model.layers[1].output = value  # CUDA rows over the CPU layer's
        return model.output.logits

    with torch.no_grad(), model.trace() as tr:
        batched = [tr.invoke(ids[i : i + 1]).run(write_layer_1, v1[i : i + 1]) for i in range(2)]
    for i, future in enumerate(batched):
        with torch.no_grad(), model.trace() as tr:
            solo = tr.invoke(ids[i : i + 1]).run(write_layer_1, v1[i : i + 1])
        gpu_close(future.result(), solo.result())


@two_gpus
def test_two_gpus_each_get_their_own_layers_values() -> None:
    plain, net = llama(), llama()
    device_map = {**{key: 0 for key in DEVICE_MAP}, "model.layers.1": 1, "lm_head": 1}
    accelerate.dispatch_model(net, device_map)
    model = mediator.Model(net)
    ids = prompt().cuda()
    v = torch.randn(2, 5, 32, device="cuda:0")
    with torch.no_grad(), model.trace(ids):
        h0 = model.model.layers[0].output
        model.model.layers[1].output = v  # cuda:0 over a cuda:1 output
        moved = model.model.layers[1].output
        logits = model.output.logits
    assert h0.device == torch.device("cuda:0") and moved.device == torch.device("cuda:1")
    with torch.no_grad():
        oracle = hooked(
            plain, {plain.model.layers[1]: lambda m, a, o: v.cpu()}, lambda: plain(ids.cpu()).logits
        )
    gpu_close(logits.cpu(), oracle)
