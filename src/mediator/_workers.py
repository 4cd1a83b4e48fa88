"""A pool of idle threads that run mediator bodies.

Starting a thread costs about as much as a small model's forward pass, so mediators run on
reused worker threads. An idle worker blocks on its own job queue and holds nothing: the job it
ran (the body, its values, its frame) is dropped before the worker reports the job done. Workers
are daemon threads named `mediator-worker-N`; the pool only grows to the largest number of
mediators that ran at once. After `os.fork` the child starts with an empty pool.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable

from ._affinity import pin_thread, start_torch_threads

Job = Callable[[], None]


class _Worker:
    __slots__ = ("jobs", "thread", "cpu", "ready")

    def __init__(self, name: str) -> None:
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.cpu: int | None = None  # the CPU it is pinned to
        self.ready = threading.Event()

    def _loop(self) -> None:
        start_torch_threads()  # before anyone pins this thread (see _affinity.py)
        self.ready.set()
        while True:
            job = self.jobs.get()
            job()
            del job


class WorkerPool:
    """Hands jobs to idle worker threads, creating one when none is idle."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._count = itertools.count()
        self.size = 0

    def submit(self, job: Callable[[Callable[[], None]], None], cpu: int | None = None) -> None:
        """Run `job(done)` on an idle worker, pinned to `cpu` if given; `job` must call
        `done()` as its last act.

        `done` puts the worker back in the pool, so a job that reports its end to someone after
        calling `done` never makes that someone wait for a new thread on the next trace. The
        worker is pinned while it still sleeps, so it wakes up on `cpu` without a migration.
        """
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            worker = _Worker(f"mediator-worker-{next(self._count)}")
            self.size += 1
            worker.thread.start()
            worker.ready.wait()
        if cpu is not None and worker.cpu != cpu:
            pin_thread(worker.thread, cpu)
            worker.cpu = cpu

        def done(worker: _Worker = worker) -> None:
            with self._lock:
                self._idle.append(worker)

        worker.jobs.put(lambda: job(done))

    def idle_threads(self) -> list[threading.Thread]:
        """The threads now waiting for a job (for tests and diagnostics)."""
        with self._lock:
            return [worker.thread for worker in self._idle]


POOL = WorkerPool()


def submit(job: Callable[[Callable[[], None]], None], cpu: int | None = None) -> None:
    """`WorkerPool.submit` on the process's pool."""
    POOL.submit(job, cpu)


def _reset_after_fork() -> None:
    global POOL
    POOL = WorkerPool()


os.register_at_fork(after_in_child=_reset_after_fork)
