"""A patching sweep on Ray: which position of the residual stream carries the induction lookup?

Each item is one prompt of the induction model, `BOS r1..r10 r1..r6` whose answer is r7, as the
rows of one invoke: the clean prompt, the corrupted prompt (the earlier r6 replaced by a token
found nowhere else), and one more copy of the corrupted prompt per position. The experiment
copies the clean residual stream after layer 0 into copy p at position p only, and returns, for
each position, the share of the answer's logit that comes back (0: nothing, 1: all of it).

The sweep runs the experiment on every prompt on two Ray workers, 32 prompts per trace (one
forward pass for 32 experiments); the same loop in this process, one trace per prompt, must give
the same numbers. Needs the `ray` extra (`pip install -e ".[ray]"`).

    python examples/sweep_on_ray.py --prompts 128
"""

import argparse
import time

import ray
import torch

import mediator
import mediator.ray
from mediator.models import induction_prompts, load_induction

parser = argparse.ArgumentParser(description="A patching sweep on a local Ray.")
parser.add_argument("--prompts", type=int, default=128, help="how many prompts to sweep")
args = parser.parse_args()

LENGTH, CUT = 10, 6
clean, corrupt, _ = induction_prompts(
    args.prompts, LENGTH, CUT, generator=torch.Generator().manual_seed(0)
)
positions = clean.shape[1]
# one item per prompt: [clean, corrupt, corrupt patched at 0, ..., corrupt patched at last]
items = [
    torch.cat([c[None], d[None].expand(1 + positions, -1)])
    for c, d in zip(clean, corrupt, strict=True)
]


def restored_by_position(model, rows):
    """Patch the clean residual stream after layer 0 into row 2 + p at position p; the share of
    the answer's logit restored, per position (a tensor of `positions` values)."""
    resid = model.layers[1].input  # this invoke's rows only
    for position in range(positions):
        resid[2 + position, position] = resid[0, position]
    answer = rows[0, CUT + 1]  # r7, the token after the clean r6
    scores = model.output[:, -1, answer]
    high, low = scores[0], scores[1]
    return (scores[2:] - low) / (high - low)


# The local loop: one trace per prompt, in this process.
model = mediator.Model(load_induction())
start = time.perf_counter()
local = []
with torch.no_grad():
    for item in items:
        with model.trace() as tr:
            future = tr.invoke(item).run(restored_by_position, model, item)
        local.append(future.result())
local_seconds = time.perf_counter() - start

# The same sweep on Ray: the only change is this call. On a cluster: ray.init(address=...).
ray.init(num_cpus=2, include_dashboard=False)
start = time.perf_counter()
swept = list(
    mediator.ray.sweep(load_induction, restored_by_position, items, workers=2, progress=False)
)
ray_seconds = time.perf_counter() - start  # includes starting the two workers
ray.shutdown()

same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(swept, local, strict=True))
mean = torch.stack(swept).mean(0)
labels = ["BOS"] + [f"r{i}" for i in range(1, LENGTH + 1)] + [f"r{i}" for i in range(1, CUT + 1)]
labels[CUT] = f"r{CUT}*"
print(f"{len(items)} prompts; share of the answer's logit restored by patching layer 0's output:")
print(
    "  "
    + "  ".join(f"{label}:{value:.2f}" for label, value in zip(labels, mean.tolist(), strict=True))
)
best = int(mean.argmax())
print(f"strongest: position {best} ({labels[best]}), {mean[best]:.2f}")
print(f"local loop {local_seconds:.1f} s, Ray sweep {ray_seconds:.1f} s (with worker start-up)")
print("same as the local loop:", "yes" if same else "NO")
if not same:
    raise SystemExit("sweep_on_ray: the sweep's results differ from the local loop's")
