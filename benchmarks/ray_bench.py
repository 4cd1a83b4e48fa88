"""A patching sweep on a local Ray against the same sweep in one process.

Run: `python benchmarks/ray_bench.py` (needs the `ray` extra; `--items 256` for a shorter run).
The experiment zeroes layer 0's output at one position of a prompt and returns the last logits;
the model is the induction model (2 layers, width 64) or, with `--width 256 --layers 4`, a
random TinyLM of that size. Figures, each for the same items:

- local, solo: one trace per item in this process (the loop a user starts from);
- local, co-batched: the sweep's own chunk runner in this process, `--chunk` items a trace;
- Ray: `mediator.ray.sweep` on `--workers` workers (Ray started with that many CPUs), timed
  from its first result to its last (steady state: the workers' start-up and first chunk are
  reported apart), and in all; each worker runs one torch thread, and so does this process for
  the local figures.

For Ray it also reports the share of the workers' time spent outside forward passes (Ray's
messages, pickling, trace set-up and the experiments' own code while no forward runs): one minus
the forwards' total time over (workers x the sweep's time). Forwards are timed by hooks on the
root module that append to a file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

import mediator
import mediator.ray
from mediator.models import TinyLM, TinyLMConfig, load_induction
from mediator.ray._chunk import run_chunk

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--items", type=int, default=1024)
parser.add_argument("--chunk", type=int, default=32, help="invokes per trace")
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--width", type=int, default=0, help="0: the induction model")
parser.add_argument("--layers", type=int, default=4)
args = parser.parse_args()


class Loader:
    """`load_model` for every figure: the model, one torch thread, and (given a log) each
    forward's duration appended to the log."""

    def __init__(self, width: int, layers: int, log: str | None = None) -> None:
        self.width, self.layers, self.log = width, layers, log

    def __call__(self) -> mediator.Model:
        torch.set_num_threads(1)
        if self.width:
            torch.manual_seed(0)
            config = TinyLMConfig(width=self.width, layers=self.layers, heads=4)
            net: torch.nn.Module = TinyLM(config).eval()
        else:
            net = load_induction()
        if self.log is not None:
            started: list[float] = []
            log = self.log
            net.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
            net.register_forward_hook(lambda *_: _append(log, time.perf_counter() - started.pop()))
        return mediator.Model(net)


def _append(path: str, seconds: float) -> None:
    with open(path, "a") as file:
        file.write(f"{seconds}\n")


def zero_position(model: mediator.Model, ids: torch.Tensor) -> torch.Tensor:
    position = int(ids[0, 1]) % ids.shape[1]
    model.layers[0].output[:, position] = 0
    return model.output[:, -1]


def timed(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def local_solo(model: mediator.Model, items: list[torch.Tensor]) -> list[Any]:
    results = []
    with torch.no_grad():
        for item in items:
            with model.trace() as tr:
                future = tr.invoke(item).run(zero_position, model, item)
            results.append(future.result())
    return results


def local_batched(model: mediator.Model, items: list[torch.Tensor]) -> list[Any]:
    results: list[Any] = []
    for first in range(0, len(items), args.chunk):
        calls = [(zero_position, item) for item in items[first : first + args.chunk]]
        results.extend(run_chunk(model, calls, first))
    return results


def on_ray(loader: Loader, items: list[torch.Tensor]) -> tuple[list[Any], float, float]:
    """The results, the seconds until the first one arrived (the workers' start-up and first
    chunk), and the seconds from then to the last."""
    start = time.perf_counter()
    sweep = mediator.ray.sweep(
        loader, zero_position, items, args.chunk, workers=args.workers, progress=False
    )
    results = [next(sweep)]
    first = time.perf_counter()
    results.extend(sweep)
    return results, first - start, time.perf_counter() - first


def main() -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    items = list(torch.randint(1, 64, (args.items, 17), generator=generator).split(1))
    model = Loader(args.width, args.layers)()
    solo_s, solo = timed(lambda: local_solo(model, items))
    batched_s, batched = timed(lambda: local_batched(model, items))

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # workers cannot import this
    with tempfile.TemporaryDirectory() as folder:
        log = str(Path(folder) / "forwards")
        swept, startup_s, ray_s = on_ray(Loader(args.width, args.layers, log), items)
        forwards = [float(line) for line in Path(log).read_text().split()]
    ray.shutdown()
    total_s = startup_s + ray_s
    same = all(
        torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
        for a, b, c in zip(swept, solo, batched, strict=True)
    )
    name = f"TinyLM width {args.width}, {args.layers} layers" if args.width else "induction model"
    print(f"{args.items} patching experiments, {name}, {args.chunk} invokes per trace")
    steady = args.items - args.chunk  # the items after the first chunk
    for label, count, seconds in (
        ("local, one trace per item", args.items, solo_s),
        (f"local, {args.chunk} items per trace", args.items, batched_s),
        (f"Ray, {args.workers} workers, after the 1st chunk", steady, ray_s),
        (f"Ray, {args.workers} workers, with start-up", args.items, total_s),
    ):
        print(f"  {label:<40} {count / seconds:8.1f} experiments/s  ({seconds:.2f} s)")
    print(f"  Ray: first result after {startup_s:.1f} s (workers' start-up and first chunk)")
    outside = 1 - sum(forwards) / (args.workers * total_s)
    outside_warm = 1 - sum(forwards[1:]) / (args.workers * ray_s)
    print(
        f"  Ray: {len(forwards)} forwards, {sum(forwards):.2f} s in forwards; share of worker time "
        f"outside forwards {outside:.0%} (in all), {outside_warm:.0%} (after the 1st chunk)"
    )
    print("  same results everywhere:", "yes" if same else "NO")


if __name__ == "__main__":
    main()
