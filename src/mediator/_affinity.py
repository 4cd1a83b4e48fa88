"""Where the threads of a trace run: CPU pinning, CPU masks and torch's intra-op threads.

Every read hands the baton from the model thread to a mediator thread and back. When the two
threads sit on different cores, each handoff has to wake the other core (about 45-60 us for a
round trip on a small machine); on one core the switch costs about 12 us. So, on Linux, a trace
pins the model thread to the CPU it is on (no migration) and its mediator workers to the same
CPU while they still sleep (they wake up there), and gives the model thread its own CPU mask
back when the trace ends. A worker that runs a job of a trace that is not pinned gets the
process's mask (`PROCESS_MASK`, read at import) first: a thread inherits its creator's mask, and
a worker may have been made, or last used, by a pinned trace.

Torch on CPU computes in parallel with OpenMP, and the OpenMP runtime keeps a team of threads per
thread that ran a parallel region; team threads inherit the mask of the thread that made them.
Before the model thread is first pinned, its team is started (when torch uses more than one
thread), so the team does not inherit the pin. Worker threads never get a team: each computes with
one intra-op thread (`one_torch_thread`), set for that thread alone through the OpenMP runtime
(and MKL) that torch loaded, so N bodies never add N times torch's thread count. Threads that a
body starts itself while the trace runs inherit the pin; `Model(net, pin_threads=False)` turns
pinning off.

This module owns `_local.warm` (whether the calling thread's team was started) and nothing else.
In a child made by `os.fork` the forking thread counts as warm: the OpenMP team its parent thread
had does not exist there, and GNU OpenMP hangs if that thread starts a parallel region; whether
the child computes in parallel is left to the child.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import torch

_local = threading.local()
_getcpu = None
if hasattr(os, "sched_setaffinity"):
    try:
        _getcpu = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        _getcpu = None

#: The CPUs the process may run on (None where masks do not exist).
PROCESS_MASK: set[int] | None = os.sched_getaffinity(0) if _getcpu is not None else None


def _thread_count_setters() -> list[Callable[[int], object]]:
    """`omp_set_num_threads` and MKL's per-thread setter, of the libraries torch loaded (found
    through torch's own extension module, so another OpenMP runtime in the process is left
    alone); none where they cannot be found."""
    try:
        torch_lib = ctypes.CDLL(torch._C.__file__)
    except OSError:
        return []
    names = ("omp_set_num_threads", "MKL_Set_Num_Threads_Local")
    return [getattr(torch_lib, name) for name in names if hasattr(torch_lib, name)]


_SET_THREADS = _thread_count_setters()


def one_torch_thread() -> None:
    """Make torch compute on the calling thread alone, without an OpenMP team. torch's own
    setting (`torch.get_num_threads()` elsewhere) and every other thread keep theirs."""
    torch.get_num_threads()  # torch's lazy per-thread setup first: it would undo ours
    for setter in _SET_THREADS:
        setter(1)


def restore_one_torch_thread() -> None:
    """Undo a `torch.set_num_threads` that a body called on this (worker) thread."""
    if torch.get_num_threads() != 1:
        for setter in _SET_THREADS:
            setter(1)


def trace_cpu() -> tuple[int, set[int]] | None:
    """Pin the calling thread to the CPU it runs on; returns (cpu, mask to restore) or None
    where pinning is not possible or not useful."""
    if _getcpu is None:
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    cpu = _getcpu()
    if cpu not in allowed:
        cpu = min(allowed)
    start_torch_threads()
    os.sched_setaffinity(0, {cpu})
    return cpu, allowed


def start_torch_threads() -> None:
    """Start the calling thread's torch intra-op team (once), so it never inherits a pin."""
    if not getattr(_local, "warm", False):
        _local.warm = True
        if torch.get_num_threads() > 1:
            torch.ones(1 << 17).sum()


def set_thread_mask(thread: threading.Thread, cpu: int | None) -> None:
    """Let another thread, one that sleeps, run on `cpu` only, or on `PROCESS_MASK` for None:
    it wakes up there, with no migration. Raises OSError if the system refuses."""
    if thread.native_id is not None and PROCESS_MASK is not None:
        os.sched_setaffinity(thread.native_id, PROCESS_MASK if cpu is None else {cpu})


def restore_current_thread(mask: set[int]) -> None:
    """Give the calling thread `mask` back."""
    os.sched_setaffinity(0, mask)


def _after_fork_in_child() -> None:
    _local.warm = True


os.register_at_fork(after_in_child=_after_fork_in_child)
