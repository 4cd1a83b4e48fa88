"""Cleanup: after every trace, whether it succeeded, failed or was
interrupted, no thread of it runs, no tap or hook of it is left, the model computes what it
computed before, no activation is kept alive but by the user's own names, the caller's CPU mask
is back; two traces at once each get their own results; Ctrl-C ends a trace within a second."""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import _thread
import gc
import os
import signal
import sys
import threading
import time
import weakref

import pytest
import torch
from conftest import MLP, Meeting, busy_workers, hook_count, patched_forwards
from torch import nn

import mediator
from mediator import MissedProviderError, OutOfOrderError, _workers

HAS_AFFINITY = hasattr(os, "sched_getaffinity")


def _affinity() -> set[int] | None:
    return os.sched_getaffinity(0) if HAS_AFFINITY else None


class Spare(MLP):
    """The conftest MLP with one submodule the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spare = nn.Linear(8, 8)


@pytest.fixture
def spare_net() -> Spare:
    torch.manual_seed(5)
    return Spare()


# -- scenarios: one trace each, with the error it must end with ----------------------------------


def _succeeds(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layers[1].output
        model.layers[1].output = h * 2
        model.layers[2].output[:, 0] = 0
        out = model.output
    assert out.shape == (3, 8)


def _succeeds_with_two_invokes(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace() as tr:
        with tr.invoke(x):
            a = model.layers[0].output
        with tr.invoke(x[:2]):
            model.layers[0].output = a[:2]
            b = model.output
    assert b.shape == (2, 8)


def _user_error(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layers[1].output
        raise ValueError("user error")


def _user_error_while_another_waits(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace() as tr:
        with tr.invoke(x):
            late = model.layers[3].output
        with tr.invoke(x):
            h = model.layers[0].output
            raise ValueError("user error in invoke 2")


def _model_error(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace(torch.randn(3, 5)):  # Linear(8, 8) cannot take 5 features
        out = model.output


def _out_of_order(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace(x):
        b = model.layers[2].output
        a = model.layers[1].output


def _missed_provider(model: mediator.Model, x: torch.Tensor) -> None:
    with model.trace(x):
        h = model.layers[0].output
        s = model.spare.output


SCENARIOS = {
    "success": (_succeeds, None),
    "success-2-invokes": (_succeeds_with_two_invokes, None),
    "user-error": (_user_error, ValueError),
    "user-error-while-another-waits": (_user_error_while_another_waits, ValueError),
    "model-error": (_model_error, RuntimeError),
    "out-of-order": (_out_of_order, OutOfOrderError),
    "missed-provider": (_missed_provider, MissedProviderError),
}


def _run(name: str, model: mediator.Model, x: torch.Tensor) -> None:
    scenario, expected = SCENARIOS[name]
    if expected is None:
        scenario(model, x)
    else:
        with pytest.raises(expected):
            scenario(model, x)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_nothing_left_behind(name, spare_net, x):
    reference = spare_net(x)
    hooks = hook_count(spare_net)
    mask = _affinity()
    tracer = sys.gettrace()
    model = mediator.Model(spare_net)

    _run(name, model, x)

    assert busy_workers() == []
    assert patched_forwards(spare_net) == []
    assert hook_count(spare_net) == hooks
    assert torch.equal(spare_net(x), reference)
    assert torch.equal(model(x), reference)
    assert _affinity() == mask
    assert sys.gettrace() is tracer
    # the model traces normally afterwards
    with model.trace(x):
        out = model.output
    assert torch.equal(out, reference)


def test_threads_do_not_grow_over_repeated_traces(spare_net, x):
    model = mediator.Model(spare_net)
    for name in SCENARIOS:  # warm up: the pool grows to the most mediators run at once
        _run(name, model, x)
    threads = threading.active_count()
    pool = _workers.POOL.size
    mask = _affinity()
    for i in range(50):
        _run(list(SCENARIOS)[i % len(SCENARIOS)], model, x)
    assert threading.active_count() <= threads
    assert _workers.POOL.size == pool
    assert busy_workers() == []
    assert patched_forwards(spare_net) == []
    assert _affinity() == mask


# -- the user's own hooks -----------------------------------------------------------------------


def test_user_hooks_stay_and_keep_being_called(net, model, x):
    calls = {"pre": 0, "fwd": 0, "root": 0, "kw": 0}

    def pre(module, args):
        calls["pre"] += 1

    def fwd(module, args, output):
        calls["fwd"] += 1

    def root(module, args, output):
        calls["root"] += 1

    def with_kwargs(module, args, kwargs, output):
        calls["kw"] += 1

    handles = [
        net.layers[1].register_forward_pre_hook(pre),
        net.layers[1].register_forward_hook(fwd),
        net.register_forward_hook(root),
        net.layers[2].register_forward_hook(with_kwargs, with_kwargs=True),
    ]
    try:
        hooks = hook_count(net)
        with model.trace(x):
            model.layers[2].output
            seen_at_2 = dict(calls)  # layer 2's own forward hook runs after its output is served
            model.layers[3].output
            seen_at_3 = dict(calls)  # layers 1 and 2 ran, the root not yet
            out = model.output
        assert seen_at_2 == {"pre": 1, "fwd": 1, "root": 0, "kw": 0}
        assert seen_at_3 == {"pre": 1, "fwd": 1, "root": 0, "kw": 1}
        assert calls == {"pre": 1, "fwd": 1, "root": 1, "kw": 1}
        assert hook_count(net) == hooks

        for failing in ("user-error", "model-error", "out-of-order"):
            _run(failing, model, x)
            assert hook_count(net) == hooks
        before = dict(calls)
        net(x)
        assert {k: calls[k] - before[k] for k in calls} == {"pre": 1, "fwd": 1, "root": 1, "kw": 1}
        assert [id(h) for h in net.layers[1]._forward_hooks.values()] == [id(fwd)]
        assert [id(h) for h in net.layers[1]._forward_pre_hooks.values()] == [id(pre)]
    finally:
        for handle in handles:
            handle.remove()


def test_a_user_hook_that_edits_an_output_still_applies_in_a_trace(net, model, x):
    handle = net.layers[0].register_forward_hook(lambda m, i, o: o * 0)
    try:
        expected = net(x)
        with model.trace(x):
            out = model.output
        assert torch.equal(out, expected)
    finally:
        handle.remove()


# -- no activation retained ---------------------------------------------------------------------


def test_a_value_read_by_the_body_dies_with_the_users_name(model, x):
    with model.trace(x):
        h = model.layers[1].output
    ref = weakref.ref(h)
    del h
    gc.collect()
    assert ref() is None


def test_keeping_the_tracer_keeps_no_body_value(model, x):
    with model.trace(x) as tr:
        h = model.layers[1].output
        ref_h = weakref.ref(h)
        ref_2 = weakref.ref(model.layers[2].output)
        doubled = h * 2
        ref_doubled = weakref.ref(doubled)
    del h, doubled
    gc.collect()
    assert tr is not None
    assert ref_h() is None
    assert ref_2() is None
    assert ref_doubled() is None


def test_keeping_the_tracer_of_several_invokes_keeps_no_body_value(model, x):
    with model.trace() as tr:
        with tr.invoke(x):
            ref_a = weakref.ref(model.layers[1].output)
        with tr.invoke(x[:2]):
            ref_b = weakref.ref(model.layers[1].output)
            b = model.layers[2].output
            ref_b2 = weakref.ref(b)
    del b
    gc.collect()
    assert tr is not None
    assert (ref_a(), ref_b(), ref_b2()) == (None, None, None)


def test_a_tensor_created_inside_the_forward_is_not_kept(net, model, x):
    made: list[weakref.ref] = []
    handle = net.layers[2].register_forward_hook(lambda m, i, o: made.append(weakref.ref(o)))
    try:
        with model.trace(x) as tr:
            model.layers[1].output = model.layers[1].output + 1
            model.layers[3].output
    finally:
        handle.remove()
    gc.collect()
    assert tr is not None
    assert len(made) == 1 and made[0]() is None


def test_a_failing_trace_retains_nothing(model, x):
    # try/except rather than pytest.raises: pytest's ExceptionInfo outlives `del info`
    tr = model.trace(x)  # `with ... as tr` binds nothing when the trace fails in __enter__
    caught = False
    try:
        with tr:
            ref = weakref.ref(model.layers[1].output)
            raise ValueError("after a read")
    except ValueError:
        caught = True
    gc.collect()
    assert caught
    assert tr is not None
    assert ref() is None


def test_a_failing_invoke_retains_nothing_of_the_waiting_one(model, x):
    caught = False
    try:
        with model.trace() as tr:
            with tr.invoke(x):
                ref_a = weakref.ref(model.layers[0].output)
                late = model.layers[3].output
            with tr.invoke(x):
                ref_b = weakref.ref(model.layers[1].output)
                raise ValueError("invoke 2")
    except ValueError:
        caught = True
    gc.collect()
    assert caught
    assert ref_a() is None and ref_b() is None


def test_keeping_the_error_of_a_failed_trace_keeps_no_activation(model, x):
    errors = []
    try:
        with model.trace(x):
            ref = weakref.ref(model.layers[1].output)  # the body binds no tensor
            raise ValueError("after a read")
    except ValueError as error:
        errors.append(error)  # a sweep that collects its errors
    gc.collect()
    assert len(errors) == 1
    assert ref() is None


def test_a_later_trace_in_the_same_function_keeps_no_deleted_value(model, x):
    with model.trace(x):
        h = model.layers[1].output
    ref = weakref.ref(h)
    with model.trace(x):
        out = model.output
    del h
    gc.collect()
    assert ref() is None


def test_keeping_the_tracer_keeps_no_value_its_body_replaced(model, x):
    with model.trace(x):
        h = model.layers[1].output
    ref = weakref.ref(h)
    with model.trace(x) as tr:
        h = model.layers[2].output
    del h
    gc.collect()
    assert tr is not None
    assert ref() is None


# -- two traces at once ------------------------------------------------------------------------


class MeetingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.meet = Meeting()
        self.second = nn.Linear(8, 8)
        self.third = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(torch.relu(self.second(self.meet(torch.relu(self.first(x))))))


def _oracle(net: MeetingNet, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same reads and swap done with plain PyTorch hooks."""
    seen = []
    handles = [
        net.first.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone())),
        net.second.register_forward_hook(lambda m, i, o: o * scale),
    ]
    try:
        out = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0], out


def _trace_in_thread(model, x, scale, results, key):
    try:
        mask = _affinity()
        with model.trace(x):
            h = model.first.output
            model.second.output = model.second.output * scale
            out = model.output
        results[key] = (h, out, _affinity() == mask)
    except BaseException as error:  # noqa: BLE001 - reported by the test
        results[key] = error


def test_two_threads_trace_the_same_model_at_once():
    torch.manual_seed(7)
    net = MeetingNet()
    inputs = {"a": (torch.randn(3, 8), 2.0), "b": (torch.randn(2, 8), -3.0)}
    expected = {key: _oracle(net, x, scale) for key, (x, scale) in inputs.items()}
    model = mediator.Model(net)
    for _ in range(3):
        net.meet.barrier = threading.Barrier(2, timeout=10)  # both forwards must overlap
        results: dict[str, object] = {}
        threads = [
            threading.Thread(target=_trace_in_thread, args=(model, x, scale, results, key))
            for key, (x, scale) in inputs.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads)
        for key in inputs:
            result = results[key]
            assert not isinstance(result, BaseException), repr(result)
            h, out, mask_restored = result
            assert torch.equal(h, expected[key][0]), key
            assert torch.equal(out, expected[key][1]), key
            assert mask_restored
        assert patched_forwards(net) == []
    net.meet.barrier = None
    assert busy_workers() == []


def test_a_plain_call_from_another_thread_during_a_trace_is_not_intercepted(net, model, x):
    other = torch.randn(5, 8)
    plain = net(other)
    reference = net(x)
    started, finished = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def call_plainly() -> None:
        started.wait(10)
        try:
            seen["net"] = net(other)
            seen["model"] = model(other)
            seen["layer"] = model.layers[1](other)
        except BaseException as error:  # noqa: BLE001
            seen["error"] = error
        finally:
            finished.set()

    thread = threading.Thread(target=call_plainly)
    thread.start()
    with model.trace(x):
        h = model.layers[1].output  # the model stands at layer 1, taps are installed
        started.set()
        came_back = finished.wait(10)
        out = model.output
    thread.join(10)
    assert came_back
    assert "error" not in seen, seen.get("error")
    assert torch.equal(seen["net"], plain)
    assert torch.equal(seen["model"], plain)
    assert torch.equal(seen["layer"], net.layers[1](other))
    assert torch.equal(out, reference)  # the other thread's calls did not count as calls


# -- Ctrl-C ---------------------------------------------------------------------------------------


def _interrupt_main() -> None:
    _thread.interrupt_main()


def _sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: the OS signal, to the process


TRIGGERS = {
    "interrupt_main": _interrupt_main,
    "SIGINT": pytest.param(
        _sigint,
        marks=pytest.mark.skipif(sys.platform != "linux", reason="os.kill SIGINT on Linux"),
    ),
}


@pytest.fixture
def main_thread_with_default_sigint():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Ctrl-C reaches the main thread only")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not handled by Python's default handler here")


def _interrupted(trace, fire, go: threading.Event, after_fire: threading.Event | None = None):
    """Run `trace()`; once `go` is set, a helper thread fires the interrupt (then sets
    `after_fire`). Returns (raised in the with, seconds from the interrupt to the exception)."""
    fired_at: list[float] = []

    def helper() -> None:
        if go.wait(10):
            fired_at.append(time.monotonic())
            fire()
        if after_fire is not None:
            after_fire.set()

    thread = threading.Thread(target=helper, name="ctrl-c-helper")
    raised = False
    ended_at = None
    try:
        thread.start()
        try:
            trace()
        except KeyboardInterrupt:
            raised = True
            ended_at = time.monotonic()
        thread.join(10)
    except KeyboardInterrupt:  # arrived late, outside the with: must not abort the test run
        raised = False
    assert fired_at, "the interrupt was never fired"
    return raised, (ended_at - fired_at[0]) if ended_at is not None else None


class SlowLayer(nn.Module):
    """Tells the test it is running, then waits until the interrupt has been fired."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.running = threading.Event()
        self.release = threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.running.set()
        self.release.wait(10)
        return self.linear(x)


class SlowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.slow = SlowLayer()
        self.last = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.slow(self.first(x)))


@pytest.mark.parametrize("trigger", list(TRIGGERS.values()), ids=list(TRIGGERS))
def test_ctrl_c_while_the_model_forward_runs(trigger, main_thread_with_default_sigint, x):
    torch.manual_seed(9)
    net = SlowNet()
    reference = net.last(net.slow.linear(net.first(x)))
    model = mediator.Model(net)
    mask = _affinity()
    reached: list[str] = []

    def trace() -> None:
        with model.trace(x):
            h = model.first.output
            out = model.last.output
            reached.append("last")

    raised, seconds = _interrupted(trace, trigger, net.slow.running, net.slow.release)
    print(
        f"\nCtrl-C ({trigger.__name__}) while the forward runs: KeyboardInterrupt "
        f"{seconds * 1000 if seconds is not None else float('nan'):.2f} ms after the interrupt"
    )
    assert raised, "KeyboardInterrupt did not come from the with"
    assert seconds < 1.0
    assert reached == []
    assert busy_workers() == []
    assert patched_forwards(net) == []
    assert _affinity() == mask
    net.slow.release.set()
    assert torch.equal(net(x), reference)


def _busy_body_case(trigger, x):
    torch.manual_seed(10)
    net = MLP()
    reference = net(x)
    model = mediator.Model(net)
    mask = _affinity()
    busy, stopped = threading.Event(), threading.Event()
    loops: list[int] = []
    budget = 1.5  # the body gives up by itself after this long, so a failure cannot hang

    def trace() -> None:
        with model.trace(x):
            h = model.layers[0].output
            deadline = time.monotonic() + budget
            busy.set()
            n = 0
            try:
                while time.monotonic() < deadline:  # the body's own code: no request in it
                    n += 1
            finally:
                loops.append(n)
                stopped.set()
            out = model.output

    start = time.monotonic()
    raised, seconds = _interrupted(trace, trigger, busy)
    print(
        f"\nCtrl-C ({trigger.__name__}) while a body is busy: KeyboardInterrupt "
        f"{seconds * 1000 if seconds is not None else float('nan'):.2f} ms after the interrupt"
    )
    assert raised, "KeyboardInterrupt did not come from the with"
    assert seconds < 1.0
    assert time.monotonic() - start < budget
    assert stopped.wait(2), "the busy body was never stopped"
    assert busy_workers() == []  # the busy worker was stopped, not left running
    assert patched_forwards(net) == []
    assert _affinity() == mask
    assert torch.equal(net(x), reference)
    with model.trace(x):  # and the next trace works
        out = model.output
    assert torch.equal(out, reference)


@pytest.mark.skipif(sys.platform != "linux", reason="os.kill SIGINT on Linux")
def test_ctrl_c_while_a_body_is_busy_sigint(main_thread_with_default_sigint, x):
    _busy_body_case(_sigint, x)


@pytest.mark.xfail(
    strict=True,
    reason="LIMITATION: the model thread waits for a busy body in a plain SimpleQueue.get() "
    "(no polling), which a real SIGINT interrupts but _thread.interrupt_main() (no OS signal) "
    "does not; it is seen when the body next hands back the baton",
)
def test_ctrl_c_while_a_body_is_busy_interrupt_main(main_thread_with_default_sigint, x):
    _busy_body_case(_interrupt_main, x)


# -- torch thread state ---------------------------------------------------------------------------


def test_body_follows_no_grad(model, x):
    weight = torch.randn(8, 8, requires_grad=True)
    with torch.no_grad():
        with model.trace(x):
            made = model.layers[1].output @ weight
            grad_enabled = torch.is_grad_enabled()
    assert grad_enabled is False
    assert made.requires_grad is False
    # and the state does not stick to the pooled worker threads
    with model.trace(x):
        made_after = model.layers[1].output @ weight
        grad_after = torch.is_grad_enabled()
    assert grad_after is True
    assert made_after.requires_grad is True


def test_body_follows_inference_mode(model, x):
    weight = torch.randn(8, 8, requires_grad=True)
    with torch.inference_mode():
        with model.trace(x):
            made = model.layers[1].output @ weight
            inference = torch.is_inference_mode_enabled()
    assert inference is True
    assert made.is_inference()
    with model.trace(x):
        inference_after = torch.is_inference_mode_enabled()
        made_after = model.layers[1].output @ weight
    assert inference_after is False
    assert not made_after.is_inference()


def test_function_invoke_follows_no_grad(model, x):
    weight = torch.randn(8, 8, requires_grad=True)

    def body() -> tuple[bool, torch.Tensor]:
        return torch.is_grad_enabled(), model.layers[0].output @ weight

    with torch.no_grad():
        with model.trace() as tr:
            future = tr.invoke(x).run(body)
    enabled, made = future.result()
    assert enabled is False and made.requires_grad is False


def test_body_follows_cpu_autocast(model, x):
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with model.trace(x):
            made = a @ a
            h = model.layers[1].output
    assert made.dtype == torch.bfloat16
    assert h.dtype == torch.bfloat16
    with model.trace(x):
        made_after = a @ a
    assert made_after.dtype == torch.float32
