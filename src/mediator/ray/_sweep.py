"""`sweep`: many experiments on a pool of Ray workers, co-batched into traces on each.

The driver (the generator `sweep` returns) cuts the items into chunks of `invokes_per_trace`,
hands each worker up to two chunks at a time (one running, one waiting, so a worker never idles
while a result travels), and yields results in item order as soon as the chunks before them are
done. It owns, for one sweep: the worker actors, the chunks in flight and to retry, and the
finished chunks not yet yielded. A worker that dies has its chunks given to a new worker; the
actors are killed when the generator ends (also when it is closed early or raises).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from .._errors import MediatorError
from ._chunk import Experiment, SweepError, as_model, run_chunk

PIPELINE = 2  # chunks in flight per worker: one running, one ready to start


class Worker:
    """A Ray actor's state: one model, built once by `load_model()`, and the experiment."""

    def __init__(self, load_model: Callable[[], Any], experiment: Experiment, grad: bool) -> None:
        self.model = as_model(load_model())
        self.experiment = experiment
        self.grad = grad

    def run(self, first_index: int, items: list[Any]) -> list[Any]:
        calls = [(self.experiment, item) for item in items]
        return run_chunk(self.model, calls, first_index, self.grad)


@dataclass
class Chunk:
    """Items `first .. first + len(items) - 1` of the sweep, and how often a worker died on it."""

    first: int
    items: list[Any]
    attempts: int = 0
    sent: int = -1  # when it was last handed to a worker (the sweep's count of hand-outs)


def sweep(
    load_model: Callable[[], Any],
    experiment: Experiment,
    items: Iterable[Any],
    invokes_per_trace: int = 32,
    workers: int | None = None,
    resources: dict[str, Any] | None = None,
    retries: int = 2,
    progress: bool = True,
    raise_errors: bool = False,
    grad: bool = False,
) -> Iterator[Any]:
    """`experiment(model, item)` for every item, on Ray workers, co-batched: an iterator of the
    results in item order.

    Each worker is a Ray actor that builds its model once with `load_model()` (a
    `mediator.Model`, or the `torch.nn.Module` to wrap) and runs chunks of up to
    `invokes_per_trace` items as one trace: `tr.invoke(item).run(experiment, model, item)` per
    item (a dict item is the invoke's keyword inputs, `tr.invoke(**item)`), all in one batched
    forward pass. Each result is what the same experiment gives in a trace of its own.

    - Results stream in item order as chunks finish; `items` may be any iterable (read as
      workers need chunks). `progress=True` shows a tqdm bar where tqdm is installed.
    - An experiment that raises: that item's result is a `SweepError` (its index, the exception,
      the traceback text); the other items go on. `raise_errors=True` raises that `SweepError`
      instead, when its turn comes.
    - A worker process that dies (a crash, a lost node): its chunks run again on a new worker,
      up to `retries` times each, so no result is lost or given twice; the last try runs their
      items one by one, so an item that kills every worker it runs on ends as a `SweepError`
      holding Ray's error, and the items it shared a chunk with still get their results.
    - `workers` actors (default: as many as the cluster's CPUs, or GPUs, fit), each with
      `resources` as Ray actor options (default `{"num_cpus": 1}`; e.g. `{"num_gpus": 1}`; then
      `load_model` should move the model to `"cuda"`).
    - Ray: a sweep uses the Ray that `ray.init(...)` started or connected to (a laptop's local
      Ray, or a cluster's address: the call is the same); if Ray is not initialised yet, the
      sweep calls `ray.init()`, which joins the cluster in `RAY_ADDRESS` or starts a local one.
    - Traces run under `torch.no_grad()` unless `grad=True`. Returned tensors are detached, and
      an invoke's rows are copied out of the batch so only they travel back.
    - `load_model`, `experiment` and the items are sent to the workers with cloudpickle: define
      them in an importable module or in `__main__`.

    Example:

        import ray, mediator, mediator.ray
        from mediator.models import load_induction

        def logit_after_patch(model, ids):
            model.layers[0].output[:, 3] = 0
            return model.output[:, -1].max().item()

        ray.init(num_cpus=2)             # or ray.init(address="ray://head:10001")
        prompts = [torch.randint(1, 64, (1, 16)) for _ in range(1000)]
        results = list(mediator.ray.sweep(load_induction, logit_after_patch, prompts))
    """
    if invokes_per_trace < 1:
        raise ValueError(f"sweep(invokes_per_trace=...) must be >= 1, got {invokes_per_trace}")
    if not ray.is_initialized():
        ray.init()
    options = dict(resources or {"num_cpus": 1})
    total = len(items) if isinstance(items, Sized) else None
    count = workers if workers is not None else default_workers(options)
    if total is not None:  # no idle workers
        count = max(1, min(count, -(-total // invokes_per_trace)))
    actor_class = ray.remote(Worker).options(**options)
    chunks = _chunks(items, invokes_per_trace)
    return _drive(
        lambda: actor_class.remote(load_model, experiment, grad),
        count,
        chunks,
        total,
        retries,
        progress,
        raise_errors,
    )


def default_workers(options: dict[str, Any]) -> int:
    """How many workers with these actor options the cluster holds at once (at least 1)."""
    cluster = ray.cluster_resources()
    fits = [
        int(cluster.get(resource, 0) // options[option])
        for option, resource in (("num_cpus", "CPU"), ("num_gpus", "GPU"))
        if options.get(option)
    ]
    return max(1, min(fits, default=int(cluster.get("CPU", 1))))


def _chunks(items: Iterable[Any], size: int) -> Iterator[Chunk]:
    iterator = iter(items)
    for first in itertools.count(0, size):
        batch = list(itertools.islice(iterator, size))
        if not batch:
            return
        yield Chunk(first, batch)


def _drive(
    new_actor: Callable[[], Any],
    count: int,
    chunks: Iterator[Chunk],
    total: int | None,
    retries: int,
    progress: bool,
    raise_errors: bool,
) -> Iterator[Any]:
    """The sweep's generator: schedule chunks on `count` actors, replace dead ones, yield in
    order."""
    bar = _progress_bar(total) if progress else None
    actors = [new_actor() for _ in range(count)]
    in_flight: dict[Any, tuple[Any, Chunk]] = {}  # result ref -> (actor, chunk)
    retry: collections.deque[Chunk] = collections.deque()
    sent = itertools.count()  # hand-outs, in order: a worker runs its chunks in that order
    blamed: dict[Any, int] = {}  # dead actor -> the hand-out it was running when it died
    finished: dict[int, list[Any]] = {}  # first item's index -> results
    next_item = 0
    try:
        while True:
            _fill(actors, in_flight, retry, chunks, sent)
            if not in_flight:
                break
            (ready,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, chunk = in_flight.pop(ready)
            results = _collect(
                ready, actor, chunk, actors, new_actor, retry, retries, in_flight, blamed
            )
            if results is None:
                continue
            finished[chunk.first] = results
            if bar is not None:
                bar.update(len(results))
            while next_item in finished:
                done = finished.pop(next_item)
                for result in done:
                    if raise_errors and isinstance(result, SweepError):
                        raise result from result.error
                    yield result
                next_item += len(done)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:
            ray.kill(actor)


def _fill(
    actors: list[Any],
    in_flight: dict[Any, tuple[Any, Chunk]],
    retry: collections.deque[Chunk],
    chunks: Iterator[Chunk],
    sent: Iterator[int],
) -> None:
    """Give every actor chunks (those to retry first) until it has `PIPELINE` in flight."""
    load = collections.Counter(actor for actor, _ in in_flight.values())
    for actor in actors:
        while load[actor] < PIPELINE:
            chunk = retry.popleft() if retry else next(chunks, None)
            if chunk is None:
                return
            chunk.sent = next(sent)
            in_flight[actor.run.remote(chunk.first, chunk.items)] = (actor, chunk)
            load[actor] += 1


def _was_running(
    actor: Any, chunk: Chunk, in_flight: dict[Any, tuple[Any, Chunk]], blamed: dict[Any, int]
) -> bool:
    """Whether `chunk` is the one its dead worker `actor` was running. A worker runs its chunks
    one after another, in the order they were handed out: the one it ran is the earliest of its
    chunks out when its death is first seen; a chunk waiting behind it is not to blame."""
    if actor not in blamed:
        waiting = [other.sent for owner, other in in_flight.values() if owner is actor]
        blamed[actor] = min([chunk.sent, *waiting])
    return blamed[actor] == chunk.sent


def _collect(
    ready: Any,
    actor: Any,
    chunk: Chunk,
    actors: list[Any],
    new_actor: Callable[[], Any],
    retry: collections.deque[Chunk],
    retries: int,
    in_flight: dict[Any, tuple[Any, Chunk]],
    blamed: dict[Any, int],
) -> list[Any] | None:
    """The chunk's results; or None when its worker died and the chunk is queued again (on a new
    worker that replaces the dead one). The chunk the worker was running counts a try: it goes
    whole, except on its last try, when each item goes alone, so that an item that kills its
    worker takes no other item with it. A chunk that was only waiting on it goes again as it was."""
    try:
        results: list[Any] = ray.get(ready)
        return results
    except RayActorError as error:
        if error.actor_init_failed:
            raise MediatorError(
                f"load_model() raised on a Ray worker, so no worker can run the sweep:\n{error}"
            ) from error
        if actor in actors:  # its other chunk in flight fails too: replace it once
            actors[actors.index(actor)] = new_actor()
        if not _was_running(actor, chunk, in_flight, blamed):
            retry.append(chunk)  # it only waited behind the chunk that killed the worker
            return None
        if chunk.attempts < retries:
            chunk.attempts += 1
            if chunk.attempts < retries or len(chunk.items) == 1:
                retry.append(chunk)
            else:
                retry.extend(
                    Chunk(chunk.first + offset, [item], chunk.attempts)
                    for offset, item in enumerate(chunk.items)
                )
            return None
        return [
            SweepError(chunk.first + offset, error, f"the worker died {retries + 1} times")
            for offset in range(len(chunk.items))
        ]


def _progress_bar(total: int | None) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="item", desc="sweep")
