"""`sweep`: many experiments on a pool of Ray workers, co-batched into traces on each.

The driver (the generator `sweep` returns) cuts the items into chunks of `invokes_per_trace`,
hands each worker that has built its model up to two chunks at a time (one running, one waiting,
so a worker never idles while a result travels), and yields results in item order as soon as the
chunks before them are done. It owns, for one sweep: the worker actors (`Pool`: starting or
started), the chunks in flight and to send (`Queue`), and the finished chunks not yet yielded. A
worker that dies has its chunks given to a new worker, and only the chunk it was running counts a
try; the actors are killed when the generator ends (also when it is closed early or raises).
"""

from __future__ import annotations

import collections
import itertools
import traceback
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from .._errors import MediatorError
from .._tree import leaves
from ._chunk import Experiment, SweepError, as_model, run_chunk

PIPELINE = 2  # chunks in flight per worker: one running, one ready to start
PLAIN = (torch.Tensor, int, float, complex, str, bytes, bool, type(None))  # always pickle


class Worker:
    """A Ray actor's state: one model, built once by `load_model()`, and the experiment."""

    def __init__(self, load_model: Callable[[], Any], experiment: Experiment, grad: bool) -> None:
        self.model = as_model(load_model())
        self.experiment = experiment
        self.grad = grad

    def ready(self) -> None:
        """Answers once the model is built: the driver sends chunks to started workers only."""

    def run(self, first_index: int, items: list[Any]) -> list[Any]:
        calls = [(self.experiment, item) for item in items]
        results = run_chunk(self.model, calls, first_index, self.grad)
        return [sendable(first_index + offset, value) for offset, value in enumerate(results)]


def sendable(index: int, result: Any) -> Any:
    """`result`, or a `SweepError` where it cannot be pickled back to the driver (a lock, an open
    file, a generator): one such result must not lose its whole chunk."""
    if all(isinstance(leaf, PLAIN) for leaf in leaves(result)):
        return result
    try:
        ray.cloudpickle.dumps(result)
    except Exception as error:
        problem = TypeError(
            f"the experiment returned {type(result).__name__}, which cannot be sent back from "
            f"the Ray worker ({type(error).__name__}: {error}); return tensors, numbers or other "
            "picklable values"
        )
        return SweepError(index, problem, traceback.format_exc())
    return result


@dataclass
class Chunk:
    """Items `first .. first + len(items) - 1` of the sweep, and how often a worker died on it."""

    first: int
    items: list[Any]
    attempts: int = 0


@dataclass
class Sent:
    """A chunk sent to an actor, and the ref of its results."""

    ref: Any
    actor: Any
    chunk: Chunk


class Queue:
    """The chunks still to send: those to run again first, then the items' next chunks (read
    from the items only when a worker needs one)."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self.retry: collections.deque[Chunk] = collections.deque()
        self.fresh = chunks

    def take(self) -> Chunk | None:
        return self.retry.popleft() if self.retry else next(self.fresh, None)

    def empty(self) -> bool:
        chunk = self.take()
        if chunk is not None:
            self.retry.appendleft(chunk)
        return chunk is None


class Pool:
    """The sweep's actors: those still building their model (by the ref of their `ready()`
    call), and those started, which take chunks. An actor that dies is replaced."""

    def __init__(self, new_actor: Callable[[], Any], retries: int) -> None:
        self.new_actor = new_actor
        self.starting: dict[Any, Any] = {}  # ready() ref -> actor
        self.ready: list[Any] = []
        self.deaths_at_start = 0
        self.retries = retries

    def start(self, count: int) -> None:
        for _ in range(count):
            actor = self.new_actor()
            self.starting[actor.ready.remote()] = actor

    def started(self, ref: Any) -> None:
        """The actor of `ref` built its model (it takes chunks now), raised, or died."""
        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as error:
            if error.actor_init_failed:
                raise MediatorError(
                    "load_model() raised on a Ray worker, so no worker can run the sweep:\n"
                    + str(error)
                ) from error
            self.deaths_at_start += 1
            if self.deaths_at_start > self.retries:
                raise MediatorError(
                    f"Ray workers died {self.deaths_at_start} times while building their model "
                    f"with load_model() (out of memory?):\n{error}"
                ) from error
            self.start(1)
            return
        self.ready.append(actor)

    def replace(self, actor: Any) -> None:
        """A started actor died: a new one starts in its place."""
        self.ready.remove(actor)
        ray.kill(actor)
        self.start(1)

    def kill(self) -> None:
        for actor in [*self.ready, *self.starting.values()]:
            ray.kill(actor)


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
    forward pass. Each result is what the same experiment gives in a trace of its own; with a
    `LanguageModel` and prompts of different lengths, values keep the left padding of their
    chunk (as in any trace), so read and patch positions from the end (`[:, -1]`) or sweep
    prompts of one length: a position counted from the start, or a whole sequence returned,
    depends on which prompts shared the chunk.

    - Results stream in item order as chunks finish; `items` may be any iterable (read as
      workers need chunks). `progress=True` shows a tqdm bar where tqdm is installed.
    - An experiment that raises: that item's result is a `SweepError` (its index, the exception,
      the traceback text); the other items go on. `raise_errors=True` raises that `SweepError`
      instead, when its turn comes.
    - A worker process that dies (a crash, a lost node): its chunks run again on a new worker,
      up to `retries` times for the chunk it was running (not for those waiting behind it), so
      no result is lost or given twice; the last try runs their
      items one by one, so an item that kills every worker it runs on ends as a `SweepError`
      holding Ray's error, and the items it shared a chunk with still get their results. A
      result that cannot be pickled back (a lock, a generator) is a `SweepError` too.
    - `workers` actors (default: as many as the cluster's CPUs, or GPUs, fit), each with
      `resources` as Ray actor options (default `{"num_cpus": 1}`; e.g. `{"num_gpus": 1}`; then
      `load_model` should move the model to `"cuda"`). Chunks go to workers that have built
      their model: a worker the cluster cannot hold yet (its CPUs busy with another job or a
      served model) takes none until it starts.
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
    if workers is not None and workers < 1:
        raise ValueError(
            f"sweep(workers=...) must be >= 1 (or None: as many as fit), got {workers}"
        )
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
    """The sweep's generator: run the chunks on a pool of `count` actors, yield in order."""
    bar = _progress_bar(total) if progress else None
    pool = Pool(new_actor, retries)
    queue = Queue(chunks)
    in_flight: dict[Any, Sent] = {}  # result ref -> the chunk and its actor, in sending order
    finished: dict[int, list[Any]] = {}  # first item's index -> results
    next_item = 0
    try:
        pool.start(count)
        while True:
            _fill(pool.ready, in_flight, queue)
            if not in_flight and queue.empty():
                break
            (ready,), _ = ray.wait([*in_flight, *pool.starting], num_returns=1)
            if ready in pool.starting:
                pool.started(ready)
                continue
            for chunk, results in _collect(ready, in_flight, pool, queue, retries):
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
        pool.kill()


def _fill(actors: list[Any], in_flight: dict[Any, Sent], queue: Queue) -> None:
    """Give every started actor chunks (those to retry first) until it has `PIPELINE` in
    flight."""
    load = collections.Counter(sent.actor for sent in in_flight.values())
    for actor in actors:
        while load[actor] < PIPELINE:
            chunk = queue.take()
            if chunk is None:
                return
            ref = actor.run.remote(chunk.first, chunk.items)
            in_flight[ref] = Sent(ref, actor, chunk)
            load[actor] += 1


def _collect(
    ready: Any, in_flight: dict[Any, Sent], pool: Pool, queue: Queue, retries: int
) -> list[tuple[Chunk, list[Any]]]:
    """The finished chunks and their results: the one of `ready`; or, when its worker died, those
    of its chunks that had finished, the others queued again (on a new worker)."""
    try:
        results: list[Any] = ray.get(ready)
    except RayActorError:
        return _settle_death(in_flight[ready].actor, in_flight, pool, queue, retries)
    return [(in_flight.pop(ready).chunk, results)]


def _settle_death(
    actor: Any, in_flight: dict[Any, Sent], pool: Pool, queue: Queue, retries: int
) -> list[tuple[Chunk, list[Any]]]:
    """Every chunk sent to the dead `actor`, in sending order: those that finished keep their
    results; the first that did not was running when it died and counts a try; those queued
    behind it run again without counting one."""
    pool.replace(actor)
    mine = [sent for sent in in_flight.values() if sent.actor is actor]
    finished: list[tuple[Chunk, list[Any]]] = []
    blamed = False
    for sent in mine:
        del in_flight[sent.ref]
        try:
            finished.append((sent.chunk, ray.get(sent.ref)))
        except RayActorError as error:
            if blamed:
                queue.retry.append(sent.chunk)
                continue
            blamed = True
            results = _charge(sent.chunk, error, queue, retries)
            if results is not None:
                finished.append((sent.chunk, results))
    return finished


def _charge(chunk: Chunk, error: RayActorError, queue: Queue, retries: int) -> list[Any] | None:
    """A chunk whose worker died while running it: queued again, whole, except on its last try,
    when each item goes alone, so that an item that kills its worker takes no other item with
    it; None then. After `retries` tries: a `SweepError` per item."""
    if chunk.attempts < retries:
        chunk.attempts += 1
        if chunk.attempts < retries or len(chunk.items) == 1:
            queue.retry.append(chunk)
        else:
            queue.retry.extend(
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
