"""Concurrency: traces from several user threads at once each
get their own results; a body may itself trace another model; importing mediator changes nothing
global.

- 4 user threads trace the SAME Model at once, each trace with several invokes (reads, swaps,
  in-place edits, an empty invoke), repeated a few dozen times; and 4 threads trace DIFFERENT
  Models at once (two of them wrapping the same module). A `Meeting` module in the forward makes
  the forwards of all threads overlap: each waits there until every thread has arrived. Each
  thread's values are compared, exactly, with a plain-PyTorch hook oracle computed beforehand on
  the same batch.
- A body that opens a trace on another model (a nested trace whose model thread is a mediator
  thread), in the with-form and the function form, gives the hook-oracle values.
- `import mediator` in a fresh interpreter leaves torch.Tensor, torch.nn.Module, torch.autograd,
  torch.nn.functional and builtins as they were (the id of every attribute), the trace and profile
  functions, the thread count, the signal handlers, and registers no global module hook; and a
  first trace changes none of them either (but the worker threads it starts).
"""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import MLP, Meeting, assert_untouched, busy_workers, hook_count, patched_forwards
from torch import nn

import mediator

REPEATS = 30
THREADS = 4


class MeetingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.meet = Meeting()
        self.second = nn.Linear(8, 8)
        self.third = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = torch.relu(self.second(self.meet(h)))
        return self.head(torch.tanh(self.third(h)))


@dataclass
class Job:
    """One thread's trace: three invokes (1, 2 and 3 rows) and an empty one, with its own edits,
    and what a plain-PyTorch run with hooks doing the same edits sees."""

    xa: torch.Tensor
    xb: torch.Tensor
    xc: torch.Tensor
    scale: float
    fill: float
    expected: dict[str, torch.Tensor] | None = None

    @classmethod
    def make(cls, seed: int) -> Job:
        gen = torch.Generator().manual_seed(seed)
        return cls(
            torch.randn(1, 8, generator=gen),
            torch.randn(2, 8, generator=gen),
            torch.randn(3, 8, generator=gen),
            scale=float(seed % 7) - 3.5,
            fill=float(seed),
        )

    def oracle(self, net: MeetingNet) -> None:
        """Invoke A (row 0) reads `first` and scales its rows of `second`; invoke B (rows 1-2)
        reads `second` and sets column 0 of its rows of `third` to `fill`; invoke C (rows 3-5)
        and the empty invoke read the output."""
        a, b, c = slice(0, 1), slice(1, 3), slice(3, 6)
        seen: dict[str, torch.Tensor] = {}

        def first(m: nn.Module, args: Any, o: torch.Tensor) -> None:
            seen["ha"] = o[a].detach().clone()

        def second(m: nn.Module, args: Any, o: torch.Tensor) -> torch.Tensor:
            seen["hb"] = o[b].detach().clone()
            new = o.clone()
            new[a] = o[a] * self.scale
            return new

        def third(m: nn.Module, args: Any, o: torch.Tensor) -> torch.Tensor:
            new = o.clone()
            new[b, 0] = self.fill
            return new

        handles = [
            net.first.register_forward_hook(first),
            net.second.register_forward_hook(second),
            net.third.register_forward_hook(third),
        ]
        try:
            with torch.no_grad():
                out = net(torch.cat([self.xa, self.xb, self.xc]))
        finally:
            for handle in handles:
                handle.remove()
        self.expected = {**seen, "out_c": out[c].clone(), "everything": out.clone()}

    def check(self, got: dict[str, torch.Tensor]) -> list[str]:
        assert self.expected is not None
        return [
            key
            for key, want in self.expected.items()
            if not (got[key].shape == want.shape and torch.equal(got[key].detach(), want))
        ]


def trace_with_bodies(model: mediator.Model, job: Job) -> dict[str, torch.Tensor]:
    """The job as with-bodies."""
    xa, xb, xc, scale, fill = job.xa, job.xb, job.xc, job.scale, job.fill
    with model.trace() as tr:
        with tr.invoke(xa):
            ha = model.first.output.clone()
            model.second.output = model.second.output * scale
        with tr.invoke(xb):
            hb = model.second.output.clone()
            model.third.output[:, 0] = fill
        with tr.invoke(xc):
            out_c = model.output
        with tr.invoke():
            everything = model.output
    return {"ha": ha, "hb": hb, "out_c": out_c, "everything": everything}


def trace_with_functions(model: mediator.Model, job: Job) -> dict[str, torch.Tensor]:
    """The same job as plain functions."""

    def invoke_a() -> torch.Tensor:
        ha = model.first.output.clone()
        model.second.output = model.second.output * job.scale
        return ha

    def invoke_b() -> torch.Tensor:
        hb = model.second.output.clone()
        model.third.output[:, 0] = job.fill
        return hb

    def read_output() -> torch.Tensor:
        return model.output

    with model.trace() as tr:
        a = tr.invoke(job.xa).run(invoke_a)
        b = tr.invoke(job.xb).run(invoke_b)
        c = tr.invoke(job.xc).run(read_output)
        everything = tr.invoke().run(read_output)
    return {
        "ha": a.result(),
        "hb": b.result(),
        "out_c": c.result(),
        "everything": everything.result(),
    }


def run_threads(
    work: list[tuple[mediator.Model, Job, Callable[[mediator.Model, Job], dict[str, Any]]]],
    meetings: list[Meeting],
) -> list[str]:
    """Run each (model, job, trace) in its own user thread, REPEATS times; every forward meets
    the others in the middle. Returns a description of every wrong or failed result."""
    problems: list[str] = []
    lock = threading.Lock()

    def worker(index: int, model: mediator.Model, job: Job, trace: Callable[..., Any]) -> None:
        for repeat in range(REPEATS):
            try:
                got = trace(model, job)
                wrong = job.check(got)
            except BaseException as error:  # noqa: BLE001 - reported by the test
                wrong = [f"{type(error).__name__}: {error}"]
            if wrong:
                with lock:
                    problems.append(f"thread {index}, repeat {repeat}: {wrong}")

    barrier = threading.Barrier(len(work), timeout=20)
    for meeting in meetings:
        meeting.barrier = barrier
    try:
        threads = [
            threading.Thread(target=worker, args=(i, *item), name=f"user-{i}")
            for i, item in enumerate(work)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "a user thread hangs"
    finally:
        for meeting in meetings:
            meeting.barrier = None
    return problems


@pytest.fixture
def meeting_net() -> MeetingNet:
    torch.manual_seed(41)
    return MeetingNet()


@pytest.mark.parametrize("form", [trace_with_bodies, trace_with_functions], ids=["with", "fn"])
def test_threads_trace_the_same_model_at_once(meeting_net, form):
    jobs = [Job.make(100 + i) for i in range(THREADS)]
    for job in jobs:
        job.oracle(meeting_net)
    model = mediator.Model(meeting_net)
    hooks = hook_count(meeting_net)
    problems = run_threads([(model, job, form) for job in jobs], [meeting_net.meet])
    assert problems == []
    assert busy_workers() == []
    assert patched_forwards(meeting_net) == []
    assert hook_count(meeting_net) == hooks
    for job in jobs:  # and one at a time, afterwards, the same
        assert job.check(form(model, job)) == []


def test_threads_trace_different_models_at_once():
    """Threads 0 and 1 trace their own modules; threads 2 and 3 trace one module through two
    different Models. With-bodies and functions mixed."""
    nets = []
    for seed in (42, 43, 44):
        torch.manual_seed(seed)
        nets.append(MeetingNet())
    shared = nets[2]
    models = [
        mediator.Model(nets[0]),
        mediator.Model(nets[1]),
        mediator.Model(shared),
        mediator.Model(shared),
    ]
    modules = [nets[0], nets[1], shared, shared]
    jobs = [Job.make(200 + i) for i in range(THREADS)]
    for job, net in zip(jobs, modules, strict=True):
        job.oracle(net)
    forms = [trace_with_bodies, trace_with_functions, trace_with_bodies, trace_with_functions]
    problems = run_threads(list(zip(models, jobs, forms, strict=True)), [net.meet for net in nets])
    assert problems == []
    assert busy_workers() == []
    for net in nets:
        assert patched_forwards(net) == []
        assert hook_count(net) == 0


def test_a_plain_forward_in_another_thread_meets_a_trace(meeting_net):
    """While a trace stands inside the forward, a plain `net(x)` from another thread (no trace)
    runs through the same modules: it is neither intercepted nor counted, many times over."""
    job = Job.make(300)
    job.oracle(meeting_net)
    plain_x = torch.randn(4, 8)
    with torch.no_grad():
        plain = meeting_net(plain_x)
    model = mediator.Model(meeting_net)

    def plain_calls(model: mediator.Model, job: Job) -> dict[str, Any]:
        with torch.no_grad():
            out = meeting_net(plain_x)
        return {"plain": out}

    plain_job = Job.make(301)
    plain_job.expected = {"plain": plain}
    problems = run_threads(
        [(model, job, trace_with_bodies), (model, plain_job, plain_calls)], [meeting_net.meet]
    )
    assert problems == []
    assert patched_forwards(meeting_net) == []


# -- a body that traces another model --------------------------------------------------------


@pytest.fixture
def two_nets() -> tuple[MLP, MLP]:
    torch.manual_seed(45)
    outer = MLP(depth=4)
    inner = MLP(depth=3)
    return outer, inner


def nested_oracle(outer: MLP, inner: MLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outer body reads outer.layers[0], feeds it to the inner model whose layers[1] output
    it doubles, and adds the inner output to outer.layers[1]'s output."""
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        handle = outer.layers[0].register_forward_hook(
            lambda m, a, o: seen.__setitem__("h", o.clone())
        )
        try:
            outer(x)
        finally:
            handle.remove()

        def double(m: nn.Module, a: Any, o: torch.Tensor) -> torch.Tensor:
            seen["g"] = o.clone()
            return o * 2

        handle = inner.layers[1].register_forward_hook(double)
        try:
            seen["inner"] = inner(seen["h"])
        finally:
            handle.remove()
        handle = outer.layers[1].register_forward_hook(lambda m, a, o: o + seen["inner"])
        try:
            seen["out"] = outer(x)
        finally:
            handle.remove()
    return seen


def _check_nested(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key in ("h", "g", "inner", "out"):
        assert torch.equal(got[key].detach(), want[key]), key


def test_nested_trace_with_bodies(two_nets, x):
    outer, inner = two_nets
    want = nested_oracle(outer, inner, x)
    a, b = mediator.Model(outer), mediator.Model(inner)
    with a.trace(x):
        h = a.layers[0].output.clone()
        with b.trace(h):
            g = b.layers[1].output.clone()
            b.layers[1].output = b.layers[1].output * 2
            inner_out = b.output
        a.layers[1].output = a.layers[1].output + inner_out
        out = a.output
    _check_nested({"h": h, "g": g, "inner": inner_out, "out": out}, want)
    assert_untouched(outer, inner)


def test_nested_trace_with_functions(two_nets, x):
    outer, inner = two_nets
    want = nested_oracle(outer, inner, x)
    a, b = mediator.Model(outer), mediator.Model(inner)

    def inner_body() -> tuple[torch.Tensor, torch.Tensor]:
        g = b.layers[1].output.clone()
        b.layers[1].output = b.layers[1].output * 2
        return g, b.output

    def outer_body() -> dict[str, torch.Tensor]:
        h = a.layers[0].output.clone()
        with b.trace() as inner_tr:
            future = inner_tr.invoke(h).run(inner_body)
        g, inner_out = future.result()
        a.layers[1].output = a.layers[1].output + inner_out
        return {"h": h, "g": g, "inner": inner_out, "out": a.output}

    with a.trace() as tr:
        result = tr.invoke(x).run(outer_body)
    _check_nested(result.result(), want)
    assert_untouched(outer, inner)


def test_nested_traces_from_two_invokes_of_one_trace(two_nets, x):
    """Two invokes of the outer trace (rows 0-2 and 3-4) each run an inner trace on their rows;
    an inner failure in a nested trace is the outer body's own exception."""
    outer, inner = two_nets
    x2 = torch.randn(2, 8)
    batch = torch.cat([x, x2])
    want = nested_oracle(outer, inner, batch)  # the edits are row-wise: one oracle for both
    a, b = mediator.Model(outer), mediator.Model(inner)
    with a.trace() as tr:
        with tr.invoke(x):
            h1 = a.layers[0].output.clone()
            with b.trace(h1):
                b.layers[1].output = b.layers[1].output * 2
                inner1 = b.output
            a.layers[1].output = a.layers[1].output + inner1
            out1 = a.output
        with tr.invoke(x2):
            h2 = a.layers[0].output.clone()
            with b.trace(h2):
                b.layers[1].output = b.layers[1].output * 2
                inner2 = b.output
            a.layers[1].output = a.layers[1].output + inner2
            out2 = a.output
    assert torch.equal(h1, want["h"][:3]) and torch.equal(h2, want["h"][3:])
    # the inner model ran on 3 and 2 rows separately: allow the last bits of a matmul to differ
    assert torch.allclose(inner1, want["inner"][:3], atol=1e-6)
    assert torch.allclose(inner2, want["inner"][3:], atol=1e-6)
    assert torch.allclose(out1.detach(), want["out"][:3], atol=1e-6)
    assert torch.allclose(out2.detach(), want["out"][3:], atol=1e-6)
    assert_untouched(outer, inner)

    class InnerFailure(Exception):
        pass

    failure = InnerFailure("inner body")
    with pytest.raises(InnerFailure) as info:
        with a.trace(x):
            h = a.layers[0].output
            with b.trace(h):
                b.layers[0].output
                raise failure
    assert info.value is failure
    assert_untouched(outer, inner)


# -- importing mediator changes nothing global ----------------------------------------------

IMPORT_PROBE = textwrap.dedent(
    """
    import builtins, json, os, signal, sys, threading
    import torch, torch.nn.functional, torch.autograd
    from torch.nn.modules import module as torch_module

    def tracer(frame, event, arg):
        return None

    def profiler(frame, event, arg):
        return None

    sys.settrace(tracer)
    sys.setprofile(profiler)
    threading.settrace(tracer)

    SPACES = {
        "torch.Tensor": torch.Tensor,
        "torch.nn.Module": torch.nn.Module,
        "torch.autograd": torch.autograd,
        "torch.autograd.Function": torch.autograd.Function,
        "torch.nn.functional": torch.nn.functional,
        "torch": torch,
        "builtins": builtins,
    }

    def state():
        return {
            "spaces": {k: {n: id(v) for n, v in vars(o).items()} for k, o in SPACES.items()},
            "global_hooks": {
                n: len(v) for n, v in vars(torch_module).items()
                if n.startswith("_global_") and isinstance(v, dict)
            },
            "settrace": sys.gettrace() is tracer,
            "setprofile": sys.getprofile() is profiler,
            "threading.settrace": threading._trace_hook is tracer,
            "threads": threading.active_count(),
            "sigint": id(signal.getsignal(signal.SIGINT)),
            "excepthook": id(sys.excepthook),
            "threading.excepthook": id(threading.excepthook),
            "grad": torch.is_grad_enabled(),
            "dtype": str(torch.get_default_dtype()),
            "torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)),
        }

    def diff(a, b):
        out = {}
        for key in a:
            if key == "spaces":
                for name in a["spaces"]:
                    x, y = a["spaces"][name], b["spaces"][name]
                    changed = sorted(n for n in x if n in y and x[n] != y[n])
                    added = sorted(set(y) - set(x))
                    removed = sorted(set(x) - set(y))
                    if changed or added or removed:
                        out[name] = {"changed": changed, "added": added, "removed": removed}
            elif a[key] != b[key]:
                out[key] = [a[key], b[key]]
        return out

    before = state()
    import mediator
    after_import = state()
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model = mediator.Model(net)

    def body():
        model[0].output = model[0].output * 0
        return model.output

    with model.trace() as tr:
        future = tr.invoke(torch.randn(3, 4)).run(body)
    assert future.result().shape == (3, 2)
    after_trace = state()
    after_trace["threads"] = before["threads"]  # the trace's worker threads stay in the pool
    hooks_left = sum(
        len(getattr(m, name)) for m in net.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks")
    ) + sum("forward" in m.__dict__ for m in net.modules())
    sys.settrace(None)
    sys.setprofile(None)
    threading.settrace(None)
    print(json.dumps({
        "import": diff(before, after_import),
        "trace": diff(before, after_trace),
        "global_hooks": before["global_hooks"],
        "hooks_left": hooks_left,
        "workers": sorted(t.name for t in threading.enumerate() if t.name.startswith("mediator")),
    }))
    """
)


def test_import_changes_nothing_global():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["import"] == {}, report["import"]
    assert report["trace"] == {}, report["trace"]
    assert set(report["global_hooks"]) >= {"_global_forward_hooks", "_global_forward_pre_hooks"}
    assert all(count == 0 for count in report["global_hooks"].values())
    assert report["hooks_left"] == 0
    assert report["workers"], "the probe's trace ran no mediator thread"
