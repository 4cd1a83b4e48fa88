"""Keeping the threads of a trace on one CPU while it runs.

Every read hands the baton from the model thread to a mediator thread and back. When the two
threads sit on different cores, each handoff has to wake the other core (about 45-60 us for a
round trip on a small machine); on one core the switch costs about 12 us. So, on Linux, a trace
pins the model thread to the CPU it is on (no migration) and its mediator workers to the same
CPU while they still sleep (they wake up there), and gives the model thread its own CPU mask
back when the trace ends. Nothing stays pinned but our own idle workers.

A thread inherits the mask of the thread that creates it. Before a thread is first pinned, torch's
intra-op thread pool for that thread is started (when torch uses more than one thread), so the
pool does not inherit the pin. Threads that a body starts itself while the trace runs do inherit
it; `Model(net, pin_threads=False)` turns pinning off.
"""

from __future__ import annotations

import ctypes
import os
import threading

import torch

_local = threading.local()
_getcpu = None
if hasattr(os, "sched_setaffinity"):
    try:
        _getcpu = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        _getcpu = None


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
    """Start the calling thread's torch intra-op pool (once), so it never inherits a pin."""
    if not getattr(_local, "warm", False):
        _local.warm = True
        if torch.get_num_threads() > 1:
            torch.ones(1 << 17).sum()


def pin_thread(thread: threading.Thread, cpu: int) -> None:
    """Pin another thread, one that sleeps, to `cpu`: it wakes up there, with no migration."""
    if thread.native_id is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(thread.native_id, {cpu})


def restore_current_thread(mask: set[int]) -> None:
    """Give the calling thread `mask` back."""
    os.sched_setaffinity(0, mask)
