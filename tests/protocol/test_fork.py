"""After `os.fork()` the child traces normally: multiprocessing with fork, DataLoader workers.

The parent traces first (so its pool has workers, which do not exist in the child), then forks;
the child runs a trace with an edit and compares it with the same edit done by hand in plain
PyTorch. The parent waits for the child's report with a timeout and kills a child that hangs, so
a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable

import pytest
import torch
from torch import nn

import mediator
from mediator import _tap, _workers

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork exists on POSIX only"),
    pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning"),  # 3.12+: threads + fork
]
CHILD_TIMEOUT = 60.0


def _by_hand(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `_traced` computes, in plain PyTorch: layer 1's output doubled."""
    layers = net.layers  # type: ignore[union-attr]
    h = torch.relu(layers[0](x))
    h = torch.relu(layers[1](h) * 2)
    for layer in layers[2:]:
        h = torch.relu(layer(h))
    return h


def _traced(model: mediator.Model, x: torch.Tensor) -> torch.Tensor:
    with model.trace(x):
        h = model.layers[1].output
        model.layers[1].output = h * 2
        out = model.output
    return out


def _traces_right(model: mediator.Model, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.equal(_traced(model, x), _by_hand(model._module, x)))


def _in_child(work: Callable[[], bool]) -> None:
    """Fork; the child runs `work()` and reports whether it returned True. Fails if the child
    reports anything else or nothing within CHILD_TIMEOUT (then it is killed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            code = 0 if work() else 2
        except BaseException:  # noqa: BLE001 - shown in the test's output
            traceback.print_exc()
        finally:
            os.write(write, bytes([code]))
            os._exit(code)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], CHILD_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        report = os.read(read, 1) if ready else b""
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert report != b"", f"the forked child hung (no report in {CHILD_TIMEOUT:.0f} s)"
    assert report == b"\x00", "the forked child traced wrongly (1: raised, 2: wrong values)"


@pytest.fixture
def traced_model(model: mediator.Model, x: torch.Tensor) -> mediator.Model:
    """The model, after traces in the parent left idle workers in the pool."""
    with model.trace() as tr:
        for _ in range(3):
            with tr.invoke(x):
                _ = model.output
    assert _traces_right(model, x)
    assert _workers.POOL.idle_threads()
    return model


def test_a_forked_child_traces(traced_model, x):
    _in_child(lambda: _traces_right(traced_model, x))


def test_a_forked_child_traces_while_another_thread_held_the_locks(traced_model, x):
    """Another thread holds the pool's lock and the taps' lock at the fork: in the child that
    thread does not exist, and the locks would stay held forever."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _workers.POOL._lock, _tap._LOCK:
            held.set()
            release.wait(CHILD_TIMEOUT)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        _in_child(lambda: _traces_right(traced_model, x))
    finally:
        release.set()
        holder.join(10)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="a trace pins its thread on Linux with two CPUs or more",
)
def test_a_child_forked_from_a_thread_with_a_torch_team_traces(traced_model, x):
    """GNU OpenMP hangs in a child whose forking thread had a team in the parent, if that thread
    starts a parallel region; the pinned trace must not start one in the child itself."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch computes with one thread here: no team")
    failures: list[BaseException] = []

    def fork_from_here() -> None:
        try:
            torch.ones(1 << 20).exp().sum()  # this thread's team now exists
            _in_child(lambda: _traces_right(traced_model, x))
        except BaseException as error:  # noqa: BLE001 - raised by the test below
            failures.append(error)

    thread = threading.Thread(target=fork_from_here)
    thread.start()
    thread.join(CHILD_TIMEOUT + 10)
    if failures:
        raise failures[0]


def test_multiprocessing_with_fork_traces(traced_model, x):
    context = multiprocessing.get_context("fork")
    results = context.SimpleQueue()

    def child() -> None:
        results.put(_traces_right(traced_model, x))

    process = context.Process(target=child)
    process.start()
    process.join(CHILD_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"the multiprocessing child hung (not done in {CHILD_TIMEOUT:.0f} s)")
    assert process.exitcode == 0
    assert results.get() is True


class _Traced(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, model: mediator.Model, x: torch.Tensor) -> None:
        self.model, self.x = model, x

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        with torch.no_grad():
            return _traced(self.model, self.x[index : index + 1])[0]


@pytest.mark.skipif(sys.platform != "linux", reason="DataLoader workers fork on Linux")
def test_dataloader_workers_trace(traced_model, x):
    x = torch.cat([x, x[:1]])  # four rows
    loader = torch.utils.data.DataLoader(
        _Traced(traced_model, x),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=CHILD_TIMEOUT,
    )
    rows = torch.cat(list(loader))
    with torch.no_grad():
        by_hand = [_by_hand(traced_model._module, x[i : i + 1])[0] for i in range(len(x))]
    assert torch.equal(rows, torch.stack(by_hand))
