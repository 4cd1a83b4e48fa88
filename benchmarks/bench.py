"""Overhead of tracing against plain PyTorch forward hooks doing the same work.

Run: `python benchmarks/bench.py` (add `--quick` for fewer repetitions). Every figure is a ratio
measured side by side in this one run: each scenario and its plain-hook baseline alternate, and
the median of several rounds is reported. One torch thread, batch 4, Linear(64) blocks.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mediator

torch.set_num_threads(1)


class MLP(nn.Module):
    """`depth` Linear(64) blocks with ReLU, the model of every scenario here."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def compare(
    a: Callable[[], object], b: Callable[[], object], calls: int, rounds: int
) -> tuple[float, float]:
    """Median seconds per call of `a` and of `b`, alternating rounds so both see the same noise."""
    for _ in range(max(10, calls // 10)):
        a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(per_call(a, calls))
        tb.append(per_call(b, calls))
    return statistics.median(ta), statistics.median(tb)


def round_trip(calls: int, same_core: bool) -> float:
    """Seconds for one queue ping-pong between two threads."""
    ping: queue.SimpleQueue[int] = queue.SimpleQueue()
    pong: queue.SimpleQueue[int] = queue.SimpleQueue()
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)

    def echo() -> None:
        if same_core:
            os.sched_setaffinity(0, {cpu})
        while ping.get():
            pong.put(1)

    thread = threading.Thread(target=echo)
    thread.start()
    if same_core:
        os.sched_setaffinity(0, {cpu})
    try:

        def once() -> None:
            ping.put(1)
            pong.get()

        for _ in range(200):
            once()
        result = statistics.median(per_call(once, calls) for _ in range(5))
    finally:
        ping.put(0)
        thread.join()
        os.sched_setaffinity(0, saved)
    return result


def hook_reading(net: MLP, layers: list[int]) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The plain-hooks baseline: a forward that saves the outputs of `layers`."""

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []
        handles = [
            net.layers[i].register_forward_hook(lambda m, a, o: saved.append(o)) for i in layers
        ]
        try:
            net(x)
        finally:
            for handle in handles:
                handle.remove()
        return saved

    return run


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, name: str, measured: float, target: float | None, detail: str) -> None:
        verdict = "" if target is None else ("PASS" if measured <= target else "MISS")
        limit = "" if target is None else f"<= {target:.2f}x"
        self.rows.append(
            (name, f"{measured:.2f}x", limit + (f" {verdict}" if verdict else ""), detail)
        )

    def check(self, name: str, passed: bool) -> None:
        self.rows.append((name, "", "PASS" if passed else "MISS", ""))

    def print(self) -> None:
        width = max(len(r[0]) for r in self.rows)
        for name, ratio, target, detail in self.rows:
            print(f"{name:<{width}}  {ratio:>7}  {target:<13}  {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    options = parser.parse_args()
    calls, rounds = (100, 5) if options.quick else (300, 9)
    report = Report()
    x = torch.randn(4, 64)

    cross = round_trip(calls * 5, same_core=False)
    same = round_trip(calls * 5, same_core=True)
    print(f"thread round trip: {cross * 1e6:.1f} us across cores, {same * 1e6:.1f} us on one core")

    net96 = MLP(96)
    model96 = mediator.Model(net96)
    wrapped, plain = compare(lambda: model96(x), lambda: net96(x), calls, rounds)
    report.add(
        "idle: wrapped model outside a trace (96 layers)",
        wrapped / plain,
        1.02,
        f"{wrapped * 1e6:.0f} us vs {plain * 1e6:.0f} us unwrapped",
    )

    for depth, target in ((12, 1.5), (96, 1.2)):
        net = MLP(depth)
        model = mediator.Model(net)

        def empty(model: mediator.Model = model) -> None:
            with model.trace(x):
                pass

        traced, plain = compare(empty, lambda net=net: net(x), calls, rounds)
        report.add(
            f"empty trace ({depth} layers)",
            traced / plain,
            target,
            f"{traced * 1e6:.0f} us vs {plain * 1e6:.0f} us plain forward",
        )

    net = MLP(12)
    model = mediator.Model(net)

    def one_read() -> None:
        with model.trace(x):
            _ = model.layers[5].output

    def one_write() -> None:
        with model.trace(x):
            model.layers[5].output = torch.zeros(4, 64)

    def six_reads() -> None:
        with model.trace(x):
            for i in range(0, 12, 2):
                _ = model.layers[i].output

    traced, hooked = compare(one_read, lambda: hook_reading(net, [5])(x), calls, rounds)
    report.add(
        "one read (12 layers)",
        traced / hooked,
        None,
        f"{traced * 1e6:.0f} us vs {hooked * 1e6:.0f} us with one hook",
    )
    written, _ = compare(one_write, lambda: hook_reading(net, [5])(x), calls, rounds)
    report.add(
        "one write (12 layers)",
        written / hooked,
        None,
        f"{written * 1e6:.0f} us vs {hooked * 1e6:.0f} us with one hook",
    )

    def no_write() -> None:
        with model.trace(x):
            _ = torch.zeros(4, 64)

    written, unwritten = compare(one_write, no_write, calls, rounds)
    report.add(
        "one write (vs the same body not writing) / same-core round trip",
        (written - unwritten) / same,
        1.0,
        f"{(written - unwritten) * 1e6:.1f} us: less than one round trip (it makes none)",
    )
    many, one = compare(six_reads, one_read, calls, rounds)
    extra = (many - one) / 5
    report.add(
        "each additional read / same-core round trip",
        extra / same,
        1.2,
        f"{extra * 1e6:.1f} us per read vs {same * 1e6:.1f} us round trip",
    )
    for invokes, target in ((4, None), (16, 2.5)):
        traced, hooked = compare(
            lambda n=invokes: many_invokes(model, x, n),
            lambda n=invokes: hook_reading(net, [5])(x.repeat(n, 1)),
            calls // 2,
            rounds,
        )
        report.add(
            f"{invokes} invokes each reading one layer (12 layers)",
            traced / hooked,
            target,
            f"{traced * 1e6:.0f} us vs {hooked * 1e6:.0f} us for one batched forward with a hook",
        )
    generation(report, calls, rounds)
    memory(report, net, model, x)
    report.print()


def memory(report: Report, net: MLP, model: mediator.Model, x: torch.Tensor) -> None:
    """A narrowed read shares the storage of the module's batched output (a view, not a copy),
    and a finished trace keeps no tensor alive."""
    batched: list[torch.Tensor] = []
    handle = net.layers[5].register_forward_hook(lambda m, a, o: batched.append(o))
    try:
        with torch.no_grad(), model.trace() as tr:
            with tr.invoke(x):
                pass
            with tr.invoke(x):
                second = model.layers[5].output
    finally:
        handle.remove()
    shared = second.untyped_storage().data_ptr() == batched[0].untyped_storage().data_ptr()
    report.check("memory: a narrowed read is a view of the batch, not a copy", shared)
    del second
    batched.clear()
    before = live_tensors()
    for _ in range(20):
        many_invokes(model, x, 4)
    after = live_tensors()
    report.check(f"memory: tensors alive after 20 traces: {after - before:+d}", after == before)


def live_tensors() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())


def many_invokes(model: mediator.Model, x: torch.Tensor, count: int) -> None:
    """`count` invokes of batch 4, each reading a different layer, in one forward."""

    def read(layer: int) -> torch.Tensor:
        return model.layers[layer].output

    with model.trace() as tr:
        for i in range(count):
            tr.invoke(x).run(read, i % 12)


def gpt2() -> tuple[nn.Module, torch.Tensor, dict[str, Any]] | None:
    """The generation scenario's model (GPT-2, 2 layers, 64 wide, built from a config), prompt
    and `generate` options: 16 greedy tokens. None without transformers."""
    try:
        import transformers
    except ImportError:
        print("(transformers not installed: generation scenario skipped)")
        return None
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=100,
        n_positions=64,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (1, 8))
    return net, ids, {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}


def generation(report: Report, calls: int, rounds: int) -> None:
    """16 new tokens of `gpt2()`, one lm_head read a step."""
    built = gpt2()
    if built is None:
        return
    net, ids, options = built
    model = mediator.Model(net)

    def traced() -> None:
        with model.generate(ids, **options) as tr:
            logits = [model.lm_head.output for _ in tr.iter[:]]
        assert len(logits) == 16

    def hooked() -> None:
        logits: list[torch.Tensor] = []
        handle = net.lm_head.register_forward_hook(lambda m, a, o: logits.append(o))
        try:
            net.generate(ids, **options)
        finally:
            handle.remove()

    count = max(10, calls // 10)
    t, h = compare(traced, hooked, count, rounds)
    report.add(
        "generation: GPT-2 16 tokens, one read a step",
        t / h,
        1.15,
        f"{t * 1e3:.2f} ms vs {h * 1e3:.2f} ms with a hook",
    )


if __name__ == "__main__":
    sys.exit(main())
