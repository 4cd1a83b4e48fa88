"""A pool of reused threads that run mediator bodies.

Starting a thread costs about as much as a small model's forward pass, so mediators run on
reused worker threads: daemon threads named `mediator-worker-N`. The pool owns them: the idle
list, the busy set, the count of workers (`size`), and the CPU mask each worker was last given.

Lifetime
    The pool grows to the largest number of mediators that ran at once, and no further. A
    worker whose job ended goes back to the idle list, or ends when `max_idle` workers are idle
    already; an idle worker waits for its next job at most `idle_timeout` seconds (a blocking
    `get`), then ends. So the idle threads of a process are bounded, and go away while no trace
    runs.

What a worker keeps
    Nothing of a job: the job (the body, its values, its frame) is dropped before the worker goes
    back, and its thread-local torch state is put back as the thread started
    (`_torchstate.reset`); a worker whose state cannot be put back ends instead. Each worker
    computes with one intra-op thread (`_affinity.one_torch_thread`), so it never owns an OpenMP
    team: N workers add N threads, not N times torch's thread count. Heavy CPU compute inside a
    body therefore runs single-threaded; the forward pass on the model thread keeps torch's
    thread count, and GPU work is unaffected.

CPU masks
    A job of a pinned trace runs on that trace's CPU; every other job runs on the process's CPUs
    (`_affinity.PROCESS_MASK`). A thread inherits its creator's mask, so a worker made, or last
    used, while a trace was pinned would otherwise stay pinned. The mask is set while the worker
    still sleeps, so it wakes up where it should.

After `os.fork` the child's `POOL` is emptied in place (the parent's threads do not exist there;
whoever holds `POOL` sees the child's pool) and its lock made anew (another thread may have held
it at the fork).
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable

from ._affinity import one_torch_thread, restore_one_torch_thread, set_thread_mask
from ._torchstate import prepare, reset

Job = Callable[[Callable[[], None]], None]
_UNKNOWN = -1  # a worker's CPU mask before the pool set it: its creator's


class _Worker:
    __slots__ = ("pool", "jobs", "thread", "cpu", "ends")

    def __init__(self, pool: WorkerPool, name: str) -> None:
        self.pool = pool
        self.jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.cpu: int | None = _UNKNOWN  # the CPU it may run on; None: the process's CPUs
        self.ends = False  # its job is its last

    def _loop(self) -> None:
        one_torch_thread()
        prepare()
        pool = self.pool
        while True:
            try:
                job = self.jobs.get(timeout=pool.idle_timeout)
            except queue.Empty:
                if pool._leave(self):
                    return
                continue  # handed a job just as it gave up waiting: it is in the queue
            job()
            del job
            if self.ends:
                return


class WorkerPool:
    """Hands jobs to idle worker threads, creating one when none is idle.

    `idle_timeout` (seconds) is how long a worker waits for a job before it ends; at most
    `max_idle` workers are kept waiting.
    """

    def __init__(self, idle_timeout: float = 60.0, max_idle: int = 64) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self._count = itertools.count()
        self._after_fork()

    def _after_fork(self) -> None:
        """Start empty (also in a forked child, where the parent's workers do not exist)."""
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self.size = 0  # workers alive and not ending: idle or busy

    def submit(self, job: Job, cpu: int | None = None) -> None:
        """Run `job(done)` on an idle worker (a new one if none is idle), on `cpu` alone if
        given, else on the process's CPUs; `job` must call `done()`, on that worker, as its
        last act.

        `done` puts the worker's torch state back and the worker back in the pool, so a job that
        reports its end to someone after calling `done` never makes that someone wait for a new
        thread on the next trace. A worker is handed a new job only after its last one called
        `done`: one still busy (say, in C code after Ctrl-C) is never handed work.

        Raises, here and now, what kept the job from being handed over: `RuntimeError` when no
        thread can be started, `OSError` when the CPU mask cannot be set. The job then never
        runs, and the pool stays consistent: a worker started or taken for it is idle again and
        counted in `size`, nothing else changed.
        """
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is not None and worker.cpu == cpu:
                self._busy.add(worker)  # the usual case: one lock, nothing else to set
        if worker is None or worker.cpu != cpu:
            worker = self._ready_worker(worker, cpu)
        worker.jobs.put(functools.partial(job, functools.partial(self._done, worker)))

    def _ready_worker(self, worker: _Worker | None, cpu: int | None) -> _Worker:
        """`worker` (a new one if None) on `cpu`, and busy; raises as `submit` says."""
        if worker is None:
            worker = _Worker(self, f"mediator-worker-{next(self._count)}")
            worker.thread.start()
            with self._lock:
                self.size += 1
        if worker.cpu != cpu:
            try:
                set_thread_mask(worker.thread, cpu)
            except BaseException:
                worker.cpu = _UNKNOWN
                with self._lock:
                    self._idle.append(worker)
                raise
            worker.cpu = cpu
        with self._lock:
            self._busy.add(worker)
        return worker

    def _done(self, worker: _Worker) -> None:
        """`worker`'s job is over (called on that worker): back to the pool, or end."""
        try:
            clean = reset()
            restore_one_torch_thread()
        except Exception:  # noqa: BLE001 - its state is unknown: the worker ends
            clean = False
        with self._lock:
            self._busy.discard(worker)
            if clean and len(self._idle) < self.max_idle:
                self._idle.append(worker)
                return
            worker.ends = True
            self.size -= 1

    def _leave(self, worker: _Worker) -> bool:
        """`worker` waited `idle_timeout` for a job: end it, unless it was just handed one."""
        with self._lock:
            if worker not in self._idle:
                return False
            self._idle.remove(worker)
            self.size -= 1
            return True

    def idle_threads(self) -> list[threading.Thread]:
        """The threads now waiting for a job (for tests and diagnostics)."""
        with self._lock:
            return [worker.thread for worker in self._idle]

    def busy_threads(self) -> list[threading.Thread]:
        """The threads now running a job that has not called `done` (for tests)."""
        with self._lock:
            return [worker.thread for worker in self._busy]


POOL = WorkerPool()


def submit(job: Callable[[Callable[[], None]], None], cpu: int | None = None) -> None:
    """`WorkerPool.submit` on the process's pool."""
    POOL.submit(job, cpu)


os.register_at_fork(after_in_child=POOL._after_fork)
