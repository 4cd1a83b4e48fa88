"""Train the built-in induction model that `mediator.models.load_induction()` loads.

A 2-layer attention-only transformer (`TinyLM` with width 64, 4 heads of width 16, 64 tokens with
BOS = 0, 64 positions, no MLPs) learns to continue repeated random sequences
`[BOS, r_1..r_n, r_1..r_n]` (distinct tokens, n from 4 to 31 so the repeat can start anywhere),
with the loss on the repeated half only. There the next token can only be found by looking up the
earlier occurrence of the current token and copying the token after it: an induction head in
layer 1, which finds that position through a previous-token head in layer 0.

Run without arguments to reproduce the shipped weights (`src/mediator/weights/induction.pt`):
training is deterministic (fixed seeds, one thread), so the same torch build on the same kind of
CPU gives the same weights bit for bit; the script says whether they match the file it replaces.
It takes about a minute on one laptop core.

    python examples/train_induction.py                                   # the shipped weights
    python examples/train_induction.py --steps 20 --out /tmp/induction.pt  # a quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mediator.models import INDUCTION_WEIGHTS, TinyLM, TinyLMConfig, repeated_tokens

CONFIG = TinyLMConfig(
    vocab_size=64, width=64, heads=4, layers=2, max_positions=64, bos_token_id=0, mlp=False
)
SHORTEST, LONGEST = 4, (CONFIG.max_positions - 1) // 2  # lengths of the repeated sequence


def train(steps: int, batch: int, lr: float, seed: int) -> TinyLM:
    """AdamW with the learning rate decaying linearly to 0, on fresh random data every step."""
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed + 1)
    net = TinyLM(CONFIG)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    for step in range(steps):
        length = int(torch.randint(SHORTEST, LONGEST + 1, (), generator=data))
        ids = repeated_tokens(batch, length, generator=data)
        logits = net(ids)[:, length + 1 : -1]  # each position of the repeat but the last
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, length + 2 :].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    return net.eval()


@torch.no_grad()
def accuracy(net: TinyLM, length: int = 20, count: int = 500, seed: int = 1234) -> str:
    """Next-token accuracy on fresh sequences: first half (chance ~ 1/63) and repeated half."""
    ids = repeated_tokens(count, length, generator=torch.Generator().manual_seed(seed))
    hits = net(ids)[:, :-1].argmax(-1) == ids[:, 1:]
    first, repeat = hits[:, :length].float().mean(), hits[:, length + 1 :].float().mean()
    return f"accuracy (n={length}): first half {first:.3f}, repeated half {repeat:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=INDUCTION_WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same arithmetic, in the same order, on every run
    start = time.perf_counter()
    net = train(args.steps, args.batch, args.lr, args.seed)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
    print(accuracy(net))
    if args.out.exists():
        old = torch.load(args.out, weights_only=True)["state_dict"]
        same = all(torch.equal(old[name], value) for name, value in net.state_dict().items())
        print(f"same weights as the {args.out.name} it replaces: {'yes' if same else 'no'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = {
        "config": dataclasses.asdict(CONFIG),
        "state_dict": net.state_dict(),
        "training": {name: vars(args)[name] for name in ("steps", "batch", "lr", "seed")},
    }
    torch.save(saved, args.out)
    print(f"saved {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
