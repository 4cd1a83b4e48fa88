"""mediator against nnsight, side by side, on the scenarios of bench.py.

Optional: needs nnsight, which is not a dependency of mediator. Install it in a separate
benchmark venv only (torch first, so pip keeps the CPU build; see README.md):

    python -m venv /tmp/peers-nns08
    /tmp/peers-nns08/bin/pip install torch==2.13.0
    /tmp/peers-nns08/bin/pip install -e . "nnsight==0.8.*"
    /tmp/peers-nns08/bin/python benchmarks/peers.py [--quick]

Each scenario runs plain PyTorch (hooks doing the same work), mediator and nnsight in
alternating rounds in this one run; medians are reported. Before timing, the values each library
read are checked against plain hooks, so the three do the same work. Goals: mediator at
least 5x faster than nnsight 0.5.x in every scenario, and no slower than nnsight >= 0.8 in the
whole-trace scenarios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MLP, gpt2, hook_reading, per_call  # noqa: E402  (sets one torch thread)

import mediator  # noqa: E402

try:
    import nnsight
    from nnsight import NNsight
except ImportError:
    nnsight = None

INSTALL = """nnsight is not installed: benchmarks/peers.py compares mediator with it.
Install it in a separate benchmark venv, never in mediator's own environment:
    python -m venv /tmp/peers-nns08
    /tmp/peers-nns08/bin/pip install torch==2.13.0     # first: keeps the CPU build
    /tmp/peers-nns08/bin/pip install -e . "nnsight==0.8.*"   # or "nnsight==0.5.*"
    /tmp/peers-nns08/bin/python benchmarks/peers.py"""

WHOLE_TRACE = ("empty trace", "one read", "one write", "4 invokes", "16 invokes")
READ_LAYERS = list(range(12))  # each additional read: 12 reads against 1, per read


def compare_all(fns: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """bench.compare for any number of callables: median seconds per call, alternating rounds."""
    for _ in range(max(10, calls // 10)):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(per_call(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} values, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), f"{what}: value {i} differs"


class Batched(NNsight if nnsight is not None else object):  # type: ignore[misc]
    """NNsight with dim-0 batching, which plain NNsight leaves to subclasses (for invokes)."""

    def _batch(self, batched, *args, **kwargs):  # type: ignore[no-untyped-def]
        # nnsight >= 0.6: _batch(invokes, fn), invokes a list of (args, kwargs) -> (args, kwargs)
        if isinstance(batched, list):
            if len(batched) == 1:
                return batched[0]
            return (torch.cat([a[0] for a, _ in batched]),), {}
        # nnsight 0.5.x: _batch(batched so far or None, *args, **kwargs) -> (batched, rows)
        if batched is None:
            return (args, kwargs), len(args[0])
        return ((torch.cat([batched[0][0], args[0]]),), batched[1]), len(args[0])

    def _batch_size(self, *inputs, **kwargs):  # type: ignore[no-untyped-def]
        return len(inputs[0]) if inputs else 0


def mlp_scenarios() -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """(name, {"plain", "mediator", "nnsight"}) for the 12-layer MLP, after checking results."""
    torch.manual_seed(0)
    net = MLP(12)
    # each library wraps its own copy: both patch the modules they wrap
    model = mediator.Model(copy.deepcopy(net))
    nns = Batched(copy.deepcopy(net))
    x = torch.randn(4, 64)

    # --- plain PyTorch
    def p_write() -> torch.Tensor:
        handle = net.layers[5].register_forward_hook(lambda m, a, o: torch.zeros(4, 64))
        try:
            return net(x)
        finally:
            handle.remove()

    # --- mediator (the work of bench.py; names bound in a body are the function's locals)
    def m_empty() -> None:
        with model.trace(x):
            pass

    def m_read() -> list[torch.Tensor]:
        with model.trace(x):
            out = model.layers[5].output
        return [out]

    def m_reads(layers: list[int]) -> list[torch.Tensor]:
        outs = []
        with model.trace(x):
            for i in layers:
                outs.append(model.layers[i].output)
        return outs

    def m_write() -> None:
        with model.trace(x):
            model.layers[5].output = torch.zeros(4, 64)

    def m_write_checked() -> torch.Tensor:
        with model.trace(x):
            model.layers[5].output = torch.zeros(4, 64)
            out = model.output
        return out

    def m_invokes(count: int) -> list[torch.Tensor]:
        """bench.many_invokes, keeping the values read."""

        def read(layer: int) -> torch.Tensor:
            return model.layers[layer].output

        with model.trace() as tr:
            futures = [tr.invoke(x).run(read, i % 12) for i in range(count)]
        return [f.result() for f in futures]

    # --- nnsight (its idiomatic API; a list made outside the block needs no .save())
    def n_empty() -> None:
        with nns.trace(x):
            pass

    def n_read() -> list[torch.Tensor]:
        with nns.trace(x):
            out = nns.layers[5].output.save()
        return [out]

    def n_reads(layers: list[int]) -> list[torch.Tensor]:
        outs = []
        with nns.trace(x):
            for i in layers:
                outs.append(nns.layers[i].output)
        return outs

    def n_write() -> None:
        with nns.trace(x):
            nns.layers[5].output = torch.zeros(4, 64)

    def n_write_checked() -> torch.Tensor:
        with nns.trace(x):
            nns.layers[5].output = torch.zeros(4, 64)
            out = nns.output.save()
        return out

    def n_invokes(count: int) -> list[torch.Tensor]:
        # nnsight runs invokes in the order the model serves them, so index what each read
        outs: dict[int, torch.Tensor] = {}
        with nns.trace() as tr:
            for i in range(count):
                with tr.invoke(x):
                    outs[i] = nns.layers[i % 12].output
        return [outs[i] for i in range(count)]

    # --- the same values from all three
    every = hook_reading(net, list(range(12)))(x)
    for name, fn in (("mediator", m_read), ("nnsight", n_read)):
        close(fn(), [every[5]], f"one read, {name}")
    want = [every[i] for i in READ_LAYERS]
    close(hook_reading(net, READ_LAYERS)(x), want, "12 reads, plain")
    for name, fn in (("mediator", m_reads), ("nnsight", n_reads)):
        close(fn(READ_LAYERS), want, f"12 reads, {name}")
        close(fn([5]), [every[5]], f"one read in a loop, {name}")
    written = p_write()
    assert not torch.allclose(written, net(x)), "the write changes nothing"
    for name, fn in (("mediator", m_write_checked), ("nnsight", n_write_checked)):
        close([fn()], [written], f"one write, {name}")
    for count in (4, 16):
        want = [every[i % 12] for i in range(count)]
        for name, fn in (("mediator", m_invokes), ("nnsight", n_invokes)):
            close(fn(count), want, f"{count} invokes, {name}")

    def invokes(count: int) -> dict[str, Callable[[], object]]:
        # plain: bench.py's baseline, one batched forward with a hook
        batch = x.repeat(count, 1)
        return {
            "plain": lambda: hook_reading(net, [5])(batch),
            "mediator": lambda: m_invokes(count),
            "nnsight": lambda: n_invokes(count),
        }

    return [
        ("plain forward", {"plain": lambda: net(x)}),
        ("empty trace", {"plain": lambda: net(x), "mediator": m_empty, "nnsight": n_empty}),
        (
            "one read",
            {"plain": lambda: hook_reading(net, [5])(x), "mediator": m_read, "nnsight": n_read},
        ),
        ("one write", {"plain": p_write, "mediator": m_write, "nnsight": n_write}),
        # each additional read: 12 reads against 1, both written as the same loop
        (
            "12 reads",
            {
                "plain": lambda: hook_reading(net, READ_LAYERS)(x),
                "mediator": lambda: m_reads(READ_LAYERS),
                "nnsight": lambda: n_reads(READ_LAYERS),
                "plain 1": lambda: hook_reading(net, [5])(x),
                "mediator 1": lambda: m_reads([5]),
                "nnsight 1": lambda: n_reads([5]),
            },
        ),
        ("4 invokes", invokes(4)),
        ("16 invokes", invokes(16)),
    ]


def generation_scenario(new: bool) -> dict[str, Callable[[], object]] | None:
    """bench.py's GPT-2 from a config, 16 greedy tokens, lm_head read at every step."""
    built = gpt2()
    if built is None:
        return None
    net, ids, options = built
    model = mediator.Model(copy.deepcopy(net))
    nns_net = copy.deepcopy(net)
    nns = NNsight(nns_net)

    def plain() -> list[torch.Tensor]:
        logits: list[torch.Tensor] = []
        handle = net.lm_head.register_forward_hook(lambda m, a, o: logits.append(o))
        try:
            net.generate(ids, **options)
        finally:
            handle.remove()
        return logits

    def traced() -> list[torch.Tensor]:
        with model.generate(ids, **options) as tr:
            logits = [model.lm_head.output for _ in tr.iter[:]]
        return logits

    def nnsight_05() -> list[torch.Tensor]:
        logits: list[torch.Tensor] = []
        with nns.generate(ids, **options) as tr:
            with tr.iter[:]:  # 0.5.x: steps are a with block
                logits.append(nns.lm_head.output)
        return logits

    def nnsight_new() -> list[torch.Tensor]:
        logits: list[torch.Tensor] = []
        # plain NNsight has no traceable generate(): trace the module's own generate
        with nns.trace(ids, fn=nns_net.generate, **options) as tr:
            for _ in tr.iter[:]:
                logits.append(nns.lm_head.output)
        return logits

    peer = nnsight_new if new else nnsight_05
    want = plain()
    assert len(want) == 16
    close(traced(), want, "generation, mediator")
    close(peer(), want, "generation, nnsight")
    return {"plain": plain, "mediator": traced, "nnsight": peer}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    options = parser.parse_args()
    if nnsight is None:
        print(INSTALL)
        return 0
    version = nnsight.__version__
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    new = major_minor >= (0, 6)
    # An open iter[:] loop makes nnsight warn on every generation that the step after the last
    # was never reached, which its docs call expected.
    warnings.filterwarnings("ignore", message=".*(never reached|was not provided).*")
    calls, rounds = (100, 5) if options.quick else (300, 9)
    print(
        f"mediator {mediator.__version__}, nnsight {version}, torch {torch.__version__}, "
        f"{'quick' if options.quick else 'full'} run ({calls} calls x {rounds} rounds)"
    )

    results: dict[str, dict[str, float]] = {}
    for name, fns in mlp_scenarios():
        count = calls // 2 if "invokes" in name else calls
        results[name] = compare_all(fns, count, rounds)
    many = results.pop("12 reads")
    results["each additional read"] = {
        k: (many[k] - many[f"{k} 1"]) / (len(READ_LAYERS) - 1)
        for k in ("plain", "mediator", "nnsight")
    }
    generation = generation_scenario(new)
    if generation is not None:
        results["generation, 16 tokens"] = compare_all(generation, max(10, calls // 10), rounds)

    order = ["plain forward", "empty trace", "one read", "one write", "each additional read"]
    order += ["4 invokes", "16 invokes", "generation, 16 tokens"]
    rows = [(name, results[name]) for name in order if name in results]
    width = max(len(name) for name, _ in rows)
    header = ("scenario", "plain us", "mediator us", "nnsight us", "ratio", "overhead ratio")
    print(f"\n{header[0]:<{width}}  " + "  ".join(f"{h:>11}" for h in header[1:]))
    for name, r in rows:
        cells = [f"{r[k] * 1e6:.1f}" if k in r else "-" for k in ("plain", "mediator", "nnsight")]
        if "mediator" in r:
            extra = r["mediator"] - r["plain"]
            cells.append(f"{r['nnsight'] / r['mediator']:.2f}x")
            cells.append(f"{(r['nnsight'] - r['plain']) / extra:.2f}x" if extra > 0 else "-")
        print(f"{name:<{width}}  " + "  ".join(f"{c:>11}" for c in cells))
    print(
        "ratio: nnsight time / mediator time (above 1: mediator faster); overhead ratio: the same"
    )
    print("for the time each spends above plain PyTorch. Goals are judged on the ratio.\n")

    timed = [(name, r) for name, r in rows if "mediator" in r]
    if not new:
        goal, limit = f"mediator >= 5x faster than nnsight {version}", 5.0
    elif major_minor >= (0, 8):
        goal, limit = f"mediator no slower than nnsight {version}", 1.0
        timed = [(name, r) for name, r in timed if name in WHOLE_TRACE]
    else:
        print(f"(no goal is set against nnsight {version}: goals are set for 0.5.x and 0.8)")
        return 0
    for name, r in timed:
        ratio = r["nnsight"] / r["mediator"]
        verdict = "PASS" if ratio >= limit else "MISS"
        gap = (r["mediator"] - r["nnsight"] / limit) * 1e6
        detail = "" if ratio >= limit else f"  (mediator {gap:.1f} us over the goal)"
        print(f"{verdict}  {goal}: {name} {ratio:.2f}x{detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
