"""Quickstart: read and overwrite a model's activations while it runs.

Builds a small residual network in code (nothing is downloaded), then reads an activation, ablates
a block, patches one input's activation into another in a single batched forward pass, and checks
every result against plain PyTorch hooks. Run: `python examples/quickstart.py`.
"""

import torch
from torch import nn

import mediator

torch.manual_seed(0)


class Block(nn.Module):
    """A residual MLP block: x + mlp(x)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class TinyNet(nn.Module):
    """Embed 16 features, 4 residual blocks, read out 10 classes."""

    def __init__(self, width: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(16, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


net = TinyNet()
model = mediator.Model(net)
x = torch.randn(2, 16)
print("modules:", ", ".join(envoy.path for envoy in model.blocks), "...")

# 1. Read an activation: the body runs while the model does, and its names stay bound afterwards.
with model.trace(x):
    hidden = model.blocks[1].output
    logits = model.output
print(f"1. blocks.1 output {tuple(hidden.shape)}, predictions {logits.argmax(-1).tolist()}")

# 2. Ablate: zero the MLP of block 2 (an in-place edit of the real tensor) and look again.
with model.trace(x):
    model.blocks[2].mlp.output[:] = 0
    ablated = model.output
print(f"2. with blocks.2.mlp zeroed, predictions {ablated.argmax(-1).tolist()}")

# 3. Patch: two invokes share one batched forward; the second takes the first one's activation.
clean, corrupt = x[:1], x[1:]
with model.trace() as tr:
    with tr.invoke(clean):
        clean_hidden = model.blocks[1].output
        clean_logits = model.output
    with tr.invoke(corrupt):
        model.blocks[1].output = clean_hidden  # waits for invoke 0 to bind it
        patched_logits = model.output
print(
    "3. patching blocks.1 from the clean input makes the corrupted one predict "
    f"{patched_logits.argmax(-1).item()} (clean predicts {clean_logits.argmax(-1).item()})"
)

# 4. The same interventions with plain PyTorch hooks, to show nothing is approximated.
seen = {}
handle = net.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
expected_logits = net(x)
handle.remove()
handle = net.blocks[2].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
expected_ablated = net(x)
handle.remove()
checks = {
    "read": torch.equal(hidden, seen["h"]) and torch.equal(logits, expected_logits),
    "ablate": torch.allclose(ablated, expected_ablated),
    "patch": torch.allclose(patched_logits, clean_logits),
}
print(
    "4. same as plain hooks:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
)
if not all(checks.values()):
    raise SystemExit("quickstart: a result differs from plain PyTorch hooks")
