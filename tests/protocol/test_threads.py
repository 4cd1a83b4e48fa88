"""The worker threads that run bodies: how many there are, where they run, how long they live,
and what the pool does when a thread cannot be started or moved.

Oracles are the operating system's own counts: the threads of the process (`/proc/self/task`),
a thread's CPU mask (`os.sched_getaffinity` of its native id), whether a thread is alive, and a
plain forward pass for what a trace computes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import mediator
from mediator import _affinity, _workers

LINUX = sys.platform == "linux"
needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="CPU masks exist on Linux, and pinning needs two CPUs",
)


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _mask_of_this_thread() -> set[int]:
    return os.sched_getaffinity(threading.get_native_id())


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- no per-worker torch thread pool ----------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="counts the threads in /proc/self/task")
def test_bodies_do_not_multiply_threads_by_torchs_thread_count(net, x, torch_threads):
    torch.set_num_threads(4)
    big = torch.randn(256, 256)
    reference = (big @ big).exp().sum()  # the caller's own team is started here
    model = mediator.Model(net)
    with model.trace(x):  # the caller's first trace (it pins, and warms the caller's team)
        _ = model.output
    invokes = 12
    before, pool = os_threads(), _workers.POOL.size
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    with model.trace() as tr:
        for _ in range(invokes):
            with tr.invoke(x):
                _ = model.layers[1].output
                sums.append((big @ big).exp().sum())  # big enough to run in parallel
                counts.append(torch.get_num_threads())
    new_workers = _workers.POOL.size - pool
    assert os_threads() - before == new_workers <= invokes
    assert all(torch.allclose(s, reference) for s in sums)
    assert counts == [1] * invokes  # a body computes on its own thread only
    assert torch.get_num_threads() == 4  # torch's own setting is left alone


def test_a_worker_computes_with_one_thread_but_the_caller_keeps_its_count(model, x, torch_threads):
    torch.set_num_threads(2)
    with model.trace(x):
        _ = model.output
        inside = torch.get_num_threads()
    assert (inside, torch.get_num_threads()) == (1, 2)


# -- the pool is bounded and shrinks ----------------------------------------------------------


def _run_at_once(pool: _workers.WorkerPool, n: int) -> list[threading.Thread]:
    """Run `n` jobs on `pool` at the same time (each waits for all), until all called done."""
    barrier = threading.Barrier(n + 1, timeout=10)
    finished = threading.Barrier(n + 1, timeout=10)
    threads: list[threading.Thread] = []

    def job(done: Callable[[], None]) -> None:
        threads.append(threading.current_thread())
        barrier.wait()
        done()
        finished.wait()

    for _ in range(n):
        pool.submit(job)
    barrier.wait()
    finished.wait()
    return threads


def test_idle_workers_are_bounded_and_end_after_the_idle_time():
    pool = _workers.WorkerPool(idle_timeout=0.3, max_idle=2)
    threads = _run_at_once(pool, 5)
    assert len(set(threads)) == 5
    for thread in threads:  # three of them end at once: only two may stay idle
        if thread not in pool.idle_threads():
            thread.join(5)
    assert sum(t.is_alive() for t in threads) == 2 == pool.size == len(pool.idle_threads())
    for thread in threads:
        thread.join(5)  # the idle ones end after 0.3 s without a job
    assert [t for t in threads if t.is_alive()] == []
    assert pool.size == 0 and pool.idle_threads() == [] and pool.busy_threads() == []
    again = _run_at_once(pool, 1)  # and the pool still works
    assert again[0] not in threads


def test_a_worker_handed_a_job_keeps_it():
    pool = _workers.WorkerPool(idle_timeout=0.05)
    ran = threading.Event()
    for _ in range(20):  # hand jobs over around the moment idle workers give up
        _run_at_once(pool, 1)
        time.sleep(0.05)
        ran.clear()
        pool.submit(lambda done: (done(), ran.set()))
        assert ran.wait(5), "a job handed to a worker that was ending never ran"


# -- CPU masks ----------------------------------------------------------------------------------


@needs_affinity
def test_an_unpinned_model_never_runs_a_body_on_a_pinned_thread(net, x):
    full = os.sched_getaffinity(0)
    pinned_model = mediator.Model(net)
    free_model = mediator.Model(net, pin_threads=False)
    invokes = 4
    for _ in range(2):
        masks: dict[str, list[set[int]]] = {"pinned": [], "free": []}
        for name, model in (("pinned", pinned_model), ("free", free_model)):
            with model.trace() as tr:
                for _ in range(invokes + (name == "pinned")):  # the pinned trace makes a worker
                    with tr.invoke(x):
                        _ = model.layers[0].output
                        masks[name].append(_mask_of_this_thread())
        assert all(len(mask) == 1 for mask in masks["pinned"])
        assert masks["free"] == [full] * invokes
    assert os.sched_getaffinity(0) == full


@needs_affinity
def test_a_worker_made_while_the_caller_is_pinned_is_not_pinned_forever(x):
    full = os.sched_getaffinity(0)
    pool = _workers.WorkerPool()
    masks: list[set[int]] = []
    done_event = threading.Event()

    def job(done: Callable[[], None]) -> None:
        masks.append(_mask_of_this_thread())
        done()
        done_event.set()

    os.sched_setaffinity(0, {min(full)})  # the creating thread is pinned: the worker inherits
    try:
        pool.submit(job)
    finally:
        os.sched_setaffinity(0, full)
    assert done_event.wait(5)
    assert masks == [full]


# -- a worker stuck after Ctrl-C ----------------------------------------------------------------


@pytest.mark.skipif(not LINUX, reason="SIGINT to the main thread on Linux")
def test_a_worker_stuck_in_c_after_ctrl_c_gets_no_new_work(net, x, sigint_ready, monkeypatch):
    model = mediator.Model(net)
    reference = net(x)
    entered, release = threading.Event(), threading.Event()
    stuck: list[threading.Thread] = []
    returned = threading.Event()
    done = _workers.POOL._done

    def watched_done(worker: Any) -> None:
        done(worker)
        if stuck and worker.thread is stuck[0]:
            returned.set()

    monkeypatch.setattr(_workers.POOL, "_done", watched_done)

    def ctrl_c() -> None:
        if entered.wait(10):
            # the model thread blocks in its get() within microseconds; a signal that lands
            # just before it blocks is only seen once the body hands the baton back
            time.sleep(0.1)
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    helper = threading.Thread(target=ctrl_c)
    helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            with model.trace(x):
                _ = model.layers[0].output
                stuck.append(threading.current_thread())
                entered.set()
                release.wait(20)  # blocks in C: the interrupt cannot stop it
    finally:
        helper.join(10)
    try:
        assert _workers.POOL.busy_threads() == stuck  # still running its job
        assert stuck[0] not in _workers.POOL.idle_threads()
        ran_on: list[threading.Thread] = []
        with model.trace() as tr:  # a second trace meanwhile runs on other workers
            for _ in range(3):
                with tr.invoke(x):
                    ran_on.append(threading.current_thread())
                    out = model.output
        assert stuck[0] not in ran_on
        assert torch.equal(out, reference)
    finally:
        release.set()
    assert returned.wait(10), "the stuck worker never finished its job"
    assert stuck[0] in _workers.POOL.idle_threads()  # only now is it handed work again


# -- a worker that cannot be started or moved ---------------------------------------------------


def test_a_thread_that_cannot_start_is_raised_by_submit_and_leaves_the_pool_clean(monkeypatch):
    pool = _workers.WorkerPool()
    ran: list[bool] = []

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            pool.submit(lambda done: (ran.append(True), done()))
    assert ran == []
    assert (pool.size, pool.idle_threads(), pool.busy_threads()) == (0, [], [])
    _run_at_once(pool, 1)  # and the pool still works
    assert pool.size == 1 and len(pool.idle_threads()) == 1


@needs_affinity
def test_a_mask_that_cannot_be_set_is_raised_by_submit_and_leaves_the_pool_clean(monkeypatch):
    pool = _workers.WorkerPool()
    ran: list[bool] = []
    [worker] = _run_at_once(pool, 1)

    def refuse(pid: int, mask: Any) -> None:
        raise OSError(22, "Invalid argument")

    for cpu in (min(os.sched_getaffinity(0)), None):
        with monkeypatch.context() as patch:
            patch.setattr(os, "sched_setaffinity", refuse)
            with pytest.raises(OSError, match="Invalid argument"):
                pool.submit(lambda done: (ran.append(True), done()), cpu)
        assert ran == []
        assert (pool.size, pool.idle_threads(), pool.busy_threads()) == (1, [worker], [])
    masks: list[set[int]] = []
    finished = threading.Event()
    pool.submit(lambda done: (masks.append(_mask_of_this_thread()), done(), finished.set()))
    assert finished.wait(5)
    assert masks == [_affinity.PROCESS_MASK]  # the mask is set for real on the next job


def test_a_trace_after_a_failed_start_works(model, x, monkeypatch):
    """The pool stays usable for traces after submit raised (the trace's own error handling is
    not part of this test)."""
    with monkeypatch.context() as patch:
        patch.setattr(_workers.POOL, "_idle", [])
        patch.setattr(threading.Thread, "start", lambda self: (_ for _ in ()).throw(OSError()))
        with pytest.raises(OSError):
            _workers.POOL.submit(lambda done: done())
    with model.trace(x):
        out = model.output
    assert torch.equal(out, model._module(x))
