"""Memory: a trace holds nothing once it has ended, however it ended.

Part 1, the soak: many consecutive traces (a mix of successful ones, user errors, OutOfOrderError,
MissedProviderError, model errors, tr.stop(), several invokes, functions, skips, caches and
barriers) do not grow the process: its resident memory (/proc/self/statm), the number of live
torch tensors, of threads, and of objects of mediator's own classes stay where they were after a
warm-up. The number of traces is 1,000 by default; soak longer with

    MEDIATOR_SOAK_TRACES=20000 pytest tests/test_memory.py

Part 2, reachability: after a trace nothing of it is reachable but what the user's own names
hold. Weak references are taken to the values a body read without binding them, to values it
swapped in, to the batched inputs, and (through plain forward hooks) to every value the model
computed at a boundary, then checked dead once the user's names are gone; for the with-form and
the function form, with the tracer kept, and for a failing trace whose exception the user keeps
(which may keep the body's own frame, but not the interleaver or its boundary values).
"""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import MLP, busy_workers, patched_forwards
from torch import nn

import mediator
from mediator import MissedProviderError, OutOfOrderError, _workers
from mediator._barrier import Barrier
from mediator._boundary import Boundary
from mediator._cache import Cache
from mediator._interleaver import Interleaver
from mediator._mediator import Mediator
from mediator._protocol import Op, Request, Signal
from mediator._tracer import Invoke, InvokeFuture, Tracer

SOAK_TRACES = int(os.environ.get("MEDIATOR_SOAK_TRACES", "1000"))

MEDIATOR_CLASSES = (
    Mediator,
    Interleaver,
    Boundary,
    Tracer,
    Invoke,
    InvokeFuture,
    Barrier,
    Cache,
    Request,
    Op,
    Signal,
)


# -- measurements ----------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (pages)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def live_objects() -> dict[str, int]:
    """Live torch tensors and objects of mediator's classes, after a full collection."""
    gc.collect()
    counts = {"tensors": 0, **{cls.__name__: 0 for cls in MEDIATOR_CLASSES}}
    for obj in gc.get_objects():
        kind = type(obj)  # type(), not isinstance(): some module proxies warn on __class__
        if issubclass(kind, torch.Tensor):
            counts["tensors"] += 1
        elif kind in MEDIATOR_CLASSES:
            counts[kind.__name__] += 1
    return counts


def snapshot() -> dict[str, int]:
    counts = live_objects()
    counts["threads"] = threading.active_count()
    counts["pool"] = _workers.POOL.size
    counts["rss"] = rss_bytes()
    return counts


# -- the soak ---------------------------------------------------------------------------------


class Spare(MLP):
    """The conftest MLP with a submodule the forward never calls (for MissedProviderError)."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(8, 8)


class Scenarios:
    """One kind of trace each; every one checks what it must (result or exception)."""

    def __init__(self) -> None:
        torch.manual_seed(31)
        self.net = Spare()
        self.model = mediator.Model(self.net)
        self.x = torch.randn(3, 8)
        self.x2 = torch.randn(2, 8)
        with torch.no_grad():
            self.plain = self.net(self.x)
        self.failures = 0

    def all(self) -> list[Callable[[], None]]:
        return [
            self.success,
            self.user_error,
            self.several_invokes,
            self.out_of_order,
            self.functions,
            self.missed_provider,
            self.stop,
            self.user_error_while_another_waits,
            self.skip_and_cache,
            self.model_error,
            self.barrier,
        ]

    def success(self) -> None:
        model, x = self.model, self.x
        with model.trace(x):
            h = model.layers[1].output
            model.layers[1].output = h * 2
            model.layers[2].output[:, 0] = 0
            out = model.output
        assert out.shape == (3, 8)

    def user_error(self) -> None:
        model, x = self.model, self.x
        try:
            with model.trace(x):
                h = model.layers[1].output
                raise ValueError("user error")
        except ValueError:
            self.failures += 1

    def several_invokes(self) -> None:
        model, x, x2 = self.model, self.x, self.x2
        with model.trace() as tr:
            with tr.invoke(x):
                clean_h = model.layers[2].output
            with tr.invoke(x2):
                model.layers[2].output = clean_h[:2]
                patched = model.output
            with tr.invoke():
                everything = model.output
        assert patched.shape == (2, 8) and everything.shape == (5, 8)

    def out_of_order(self) -> None:
        model, x = self.model, self.x
        try:
            with model.trace(x):
                late = model.layers[2].output
                early = model.layers[1].output
        except OutOfOrderError:
            self.failures += 1

    def functions(self) -> None:
        model, x, x2 = self.model, self.x, self.x2

        def ablate(layer: int) -> torch.Tensor:
            model.layers[layer].output = torch.zeros_like(model.layers[layer].output)
            return model.output.argmax(-1)

        with model.trace() as tr:
            a = tr.invoke(x).run(ablate, 0)
            b = tr.invoke(x2).run(ablate, 1)
        assert a.result().shape == (3,) and b.result().shape == (2,)

    def missed_provider(self) -> None:
        model, x = self.model, self.x
        try:
            with model.trace(x):
                h = model.layers[0].output
                s = model.spare.output
        except MissedProviderError:
            self.failures += 1

    def stop(self) -> None:
        model, x = self.model, self.x
        with model.trace(x) as tr:
            h = model.layers[1].output
            tr.stop()
        assert h.shape == (3, 8)

    def user_error_while_another_waits(self) -> None:
        model, x, x2 = self.model, self.x, self.x2
        try:
            with model.trace() as tr:
                with tr.invoke(x):
                    late = model.layers[3].output
                with tr.invoke(x2):
                    early = model.layers[0].output
                    raise KeyError("invoke 2")
        except KeyError:
            self.failures += 1

    def skip_and_cache(self) -> None:
        model, x = self.model, self.x
        with model.trace(x) as tr:
            cache = tr.cache(inputs=True)
            model.layers[1].skip(model.layers[1].input * 0)
            out = model.output
        assert len(cache["layers.3"]) == 1

    def model_error(self) -> None:
        model = self.model
        try:
            with model.trace(torch.randn(3, 5)):  # Linear(8, 8) cannot take 5 features
                out = model.output
        except RuntimeError:
            self.failures += 1

    def barrier(self) -> None:
        model, x, x2 = self.model, self.x, self.x2
        box: dict[str, torch.Tensor] = {}
        with model.trace() as tr:
            bar = tr.barrier(2)
            with tr.invoke(x):
                model.layers[1].output
                bar()
                model.layers[1].output = box["h"].sum() + model.layers[1].output
            with tr.invoke(x2):
                box["h"] = model.layers[1].output
                bar()
        assert box["h"].shape == (2, 8)


def test_consecutive_traces_do_not_grow():
    scenarios = Scenarios()
    kinds = scenarios.all()
    for _ in range(3):  # warm-up: the pool reaches its size, torch and Python their caches
        for run in kinds:
            run()
    before = snapshot()
    traces = -(-SOAK_TRACES // len(kinds)) * len(kinds)  # whole rounds: the same one runs last
    scenarios.failures = 0
    start = time.perf_counter()
    for i in range(traces):
        kinds[i % len(kinds)]()
    seconds = time.perf_counter() - start
    after = snapshot()
    growth = after["rss"] - before["rss"]
    print(
        f"\n{traces} traces ({scenarios.failures} failed as intended) in {seconds:.2f} s "
        f"({seconds / traces * 1e6:.0f} us each): RSS {before['rss'] / 2**20:.1f} -> "
        f"{after['rss'] / 2**20:.1f} MiB ({growth / 2**10:+.0f} KiB), tensors "
        f"{before['tensors']} -> {after['tensors']}, threads {before['threads']} -> "
        f"{after['threads']}, pool {before['pool']} -> {after['pool']}"
    )
    assert scenarios.failures == traces // len(kinds) * 5
    assert after["tensors"] == before["tensors"]
    for cls in MEDIATOR_CLASSES:
        assert after[cls.__name__] == before[cls.__name__], cls.__name__
    assert after["threads"] == before["threads"]
    assert after["pool"] == before["pool"]
    # A leak of one [3, 8] activation per trace would be ~0.3 KiB a trace with its tensor object;
    # the counts above catch that exactly. RSS catches leaks outside Python objects (storages
    # freed late, C++ state): allow for allocator noise, not for growth with the trace count.
    assert growth < 8 * 2**20 + 256 * traces, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert busy_workers() == []
    assert patched_forwards(scenarios.net) == []
    with torch.no_grad():
        assert torch.equal(scenarios.net(scenarios.x), scenarios.plain)


def test_rss_of_the_second_half_of_the_soak_is_flat():
    """Growth that scales with the number of traces shows as growth between two equal halves."""
    scenarios = Scenarios()
    kinds = scenarios.all()
    half = -(-SOAK_TRACES // 2 // len(kinds)) * len(kinds)
    for i in range(half):  # the first half is the warm-up
        kinds[i % len(kinds)]()
    gc.collect()
    middle = rss_bytes()
    for i in range(half):
        kinds[i % len(kinds)]()
    gc.collect()
    end = rss_bytes()
    print(f"\nRSS over the second {half} traces: {(end - middle) / 2**10:+.0f} KiB")
    assert end - middle < 4 * 2**20 + 128 * half


# -- reachability -----------------------------------------------------------------------------


class Watch:
    """Weak references to every tensor the model saw at a boundary (inputs and outputs of every
    module, via plain forward hooks), named by module path."""

    def __init__(self, net: nn.Module) -> None:
        self.refs: list[tuple[str, weakref.ref[torch.Tensor]]] = []
        self.handles = []
        for path, module in net.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._pre(path)))
            self.handles.append(module.register_forward_hook(self._post(path)))

    def _pre(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            for i, arg in enumerate(args):
                if isinstance(arg, torch.Tensor):
                    self.refs.append((f"{path or 'model'}.input[{i}]", weakref.ref(arg)))

        return hook

    def _post(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self.refs.append((f"{path or 'model'}.output", weakref.ref(output)))

        return hook

    def ignore(self, *values: torch.Tensor) -> None:
        """Stop watching these values (the user's own: the inputs, a name kept on purpose)."""
        ids = {id(v) for v in values} | {id(v._base) for v in values if v._base is not None}
        self.refs = [(name, ref) for name, ref in self.refs if id(ref()) not in ids]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def alive(self, *refs: tuple[str, weakref.ref[Any]]) -> list[str]:
        """Names of the watched (and the given) values that are still alive."""
        gc.collect()
        return [name for name, ref in [*self.refs, *refs] if ref() is not None]


@pytest.fixture
def watch(net) -> Iterator[Watch]:
    watcher = Watch(net)
    yield watcher
    watcher.remove()


def test_with_form_keeps_only_the_users_names(model, x, watch):
    """Read-but-unbound values, a swapped-in value, every boundary value: dead once the trace
    ended, with the tracer kept (it holds `tr.result`, the traced call's return value, and
    nothing else). Under no_grad, so no autograd graph legitimately holds any of them."""
    refs: dict[str, weakref.ref[Any]] = {}
    with torch.no_grad():
        with model.trace(x) as tr:
            refs["read layers.0"] = weakref.ref(model.layers[0].output)
            new = model.layers[1].output * 2
            refs["swapped in layers.1"] = weakref.ref(new)
            model.layers[1].output = new
            refs["read layers.2 input"] = weakref.ref(model.layers[2].input)
            kept = model.layers[3].output
            del new
    watch.ignore(x, kept, tr.result)  # the user's input, the name it bound, tr.result
    assert watch.alive(*refs.items()) == []
    assert kept.shape == (3, 8)


def test_with_form_several_invokes_keep_no_batched_value(model, x, watch):
    """Two invokes and an empty one, with grad enabled: the batched input (the concatenation of
    theirs), every invoke's narrowed view at a boundary, merged values after swaps, values
    swapped in. The bodies' values die while the tracer is kept; once `tr` is gone too (its
    result holds the forward's autograd graph, as `out = net(x)` would), everything is."""
    x2 = torch.randn(2, 8)
    refs: dict[str, weakref.ref[Any]] = {}
    with model.trace() as tr:
        with tr.invoke(x):
            refs["view of invoke 0"] = weakref.ref(model.layers[1].output)
            model.layers[1].output = model.layers[1].output + 1
            refs["inputs of invoke 0"] = weakref.ref(model.layers[2].inputs[0][0])
        with tr.invoke(x2):
            swapped = torch.zeros(2, 8)
            refs["swapped in by invoke 1"] = weakref.ref(swapped)
            model.layers[2].output = swapped
            del swapped
            total = model.output.sum().item()
        with tr.invoke():
            refs["whole-batch view"] = weakref.ref(model.layers[3].output)
    assert isinstance(total, float)
    assert [name for name, _ in watch.refs].count("model.input[0]") == 1  # the batched input
    gc.collect()
    assert [name for name, ref in refs.items() if ref() is not None] == []
    assert tr.result.shape == (5, 8)
    del tr
    assert watch.alive(*refs.items()) == []


def test_function_form_keeps_only_what_it_returns(model, x, watch):
    """Functions read and swap; the user keeps the tracer and the futures. Under no_grad."""
    x2 = torch.randn(2, 8)
    refs: dict[str, weakref.ref[Any]] = {}

    def body(tag: str, scale: float) -> torch.Tensor:
        refs[f"{tag} read"] = weakref.ref(model.layers[0].output)
        new = model.layers[1].output * scale
        refs[f"{tag} swapped in"] = weakref.ref(new)
        model.layers[1].output = new
        return model.output.argmax(-1)

    with torch.no_grad():
        with model.trace() as tr:
            first = tr.invoke(x).run(body, "invoke 0", 2.0)
            second = tr.invoke(x2).run(body, "invoke 1", -1.0)
    kept = first.result(), second.result()
    watch.ignore(tr.result)
    assert watch.alive(*refs.items()) == []
    assert kept[0].shape == (3,) and kept[1].shape == (2,)


def test_keeping_only_the_futures_keeps_no_activation(model, x, watch):
    def body() -> torch.Tensor:
        return model.output.argmax(-1)

    def sweep() -> list[Any]:
        futures = []
        for _ in range(3):
            with model.trace() as tr:
                futures.append(tr.invoke(x).run(body))
        return futures

    futures = sweep()  # the tracers are gone; only the futures are kept
    assert [f.result().shape for f in futures] == [(3,)] * 3
    watch.ignore(x)
    assert watch.alive() == []


def test_a_value_the_body_bound_dies_with_the_users_name(model, x, watch):
    """With grad enabled, a bound value holds its autograd graph; deleting the user's names
    (h, out and tr, whose result holds the graph too) frees every activation."""
    with model.trace(x) as tr:
        h = model.layers[1].output
        out = model.output
    assert out.requires_grad
    watch.ignore(x)
    assert "layers.1.output" in watch.alive()  # h
    del h, out, tr
    assert watch.alive() == []


def assert_no_interleaver_holds_a_value(boundaries_before: int) -> None:
    """No Boundary more than before is alive, and an Interleaver that is (a kept body frame may
    reach one through its thread's frames) was emptied when its trace ended."""
    gc.collect()
    assert sum(type(o) is Boundary for o in gc.get_objects()) == boundaries_before
    for il in [o for o in gc.get_objects() if type(o) is Interleaver]:
        assert il.current is None and il.mediators == [] and il.due == {}
        assert il.caches == [] and il.barriers == []
        assert type(il.result) is object  # the _MISSING marker: no traced result kept


def _failing_with_form(model: mediator.Model, x: torch.Tensor, refs: dict, errors: list) -> None:
    x2 = x[:2] * 3
    try:
        with model.trace() as tr:
            with tr.invoke(x):
                bound = model.layers[1].output  # the body's own frame keeps this one
                refs["read, not bound"] = weakref.ref(model.layers[2].output)
                new = torch.ones(3, 8)
                refs["swapped in"] = weakref.ref(new)
                model.layers[3].output = new
                del new
                late = model.output
            with tr.invoke(x2):
                refs["invoke 1 read"] = weakref.ref(model.layers[2].output)
                raise ValueError("invoke 1 failed")
    except ValueError as error:
        errors.append(error)


def _failing_function(model: mediator.Model, x: torch.Tensor, refs: dict, errors: list) -> None:
    def body() -> None:
        bound = model.layers[1].output  # kept by this frame, in the traceback
        refs["read, not bound"] = weakref.ref(model.layers[2].output)
        new = torch.ones(3, 8)
        refs["swapped in"] = weakref.ref(new)
        model.layers[3].output = new
        del new
        raise ValueError("the function failed")

    def other() -> torch.Tensor:
        refs["invoke 1 read"] = weakref.ref(model.layers[2].output)
        return model.output

    try:
        with model.trace() as tr:
            tr.invoke(x).run(body)
            tr.invoke(x[:2] * 3).run(other)
    except ValueError as error:
        errors.append(error)


@pytest.mark.parametrize("form", ["with", "function"])
def test_a_kept_exception_keeps_the_body_frame_but_no_boundary_value(model, x, watch, form):
    """Keeping the exception may keep the body's own frame (its bound names), but not the
    interleaver and its boundary values. Under no_grad, so no graph links the values."""
    refs: dict[str, weakref.ref[Any]] = {}
    errors: list[BaseException] = []
    before = live_objects()
    with torch.no_grad():
        (_failing_with_form if form == "with" else _failing_function)(model, x, refs, errors)
    assert len(errors) == 1
    assert_no_interleaver_holds_a_value(before["Boundary"])
    alive = watch.alive(*refs.items())
    # `bound` is invoke 0's view of layers.1's batched output; its frame is in the traceback
    assert set(alive) <= {"layers.1.output"}, alive
    errors.clear()
    assert watch.alive() == []
    after = live_objects()
    assert {k: v for k, v in after.items() if k != "tensors"} == {
        k: v for k, v in before.items() if k != "tensors"
    }


def test_nothing_of_many_failed_traces_accumulates_while_errors_are_kept(model, x, watch):
    """A sweep that keeps every error: each keeps at most its own body's frame, no trace's
    interleaver, boundary or batched value."""
    errors: list[BaseException] = []
    refs: dict[str, weakref.ref[Any]] = {}
    before = live_objects()
    with torch.no_grad():
        for _ in range(20):
            _failing_with_form(model, x, refs, errors)
    assert len(errors) == 20
    assert_no_interleaver_holds_a_value(before["Boundary"])
    assert live_objects()["Op"] == before["Op"]
    assert set(watch.alive(*refs.items())) <= {"layers.1.output"}
    errors.clear()
    assert watch.alive() == []


def test_soak_knob_is_read_from_the_environment():
    assert SOAK_TRACES == int(os.environ.get("MEDIATOR_SOAK_TRACES", "1000"))
    assert SOAK_TRACES >= 1
    assert "MEDIATOR_SOAK_TRACES=20000 pytest tests/test_memory.py" in (__doc__ or "")


def _garbage_cycles_of(run: Callable[[], None]) -> list[str]:
    """Type names of the objects that only the cycle collector could free after `run()`, run
    a second time (the first compiles the with-bodies, and `ast` leaves cycles of its own)."""
    run()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        run()
        gc.collect()
        return sorted({type(obj).__name__ for obj in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_traces_leave_no_reference_cycles(model, x):
    """Every value of a finished trace is freed by reference counting, at once: nothing waits
    for (or triggers) the cycle collector, whose pauses would land in later forward passes."""

    def run() -> None:
        with model.trace(x):
            pass
        with model.trace(x):
            h = model.layers[1].output
            model.layers[2].output = h * 2
        with model.trace() as tr:
            with tr.invoke(x[:1]):
                a = model.layers[0].output
            with tr.invoke(x[1:2]):
                model.layers[0].output = a
            future = tr.invoke(x).run(lambda: model.output)
        assert future.result() is not None
        with model.trace(x) as tr:
            for _step in tr.iter[0:1]:
                _ = model.layers[3].output

    assert _garbage_cycles_of(run) == []


def test_generation_with_an_open_loop_leaves_no_reference_cycles():
    """The end of an open `tr.iter[:]` loop is an exception inside the body's thread: neither
    it nor its traceback may hold on to the trace."""
    net = mediator.models.TinyLM().eval()
    model = mediator.Model(net)
    ids = torch.tensor([[3, 1, 4, 1, 5]])

    def run() -> None:
        with model.generate(ids, max_new_tokens=3) as tr:
            logits = [model.lm_head.output for _ in tr.iter[:]]
            tokens = tr.result
        assert len(logits) == 3 and tokens.shape == (1, 8)

    assert _garbage_cycles_of(run) == []


def test_a_value_the_body_dropped_is_freed_while_the_trace_runs(model, x):
    """The late-edit check watches values weakly: one the body no longer holds goes as soon as
    the model is done with it, not at the end of the trace (long generations read a lot)."""
    alive = {}
    with torch.no_grad(), model.trace(x):
        first = weakref.ref(model.layers[0].output)
        model.layers[2].output  # noqa: B018 - the model has moved past layer 0 (and layer 1)
        alive["layer 0 output"] = first() is not None
    assert alive == {"layer 0 output": False}
