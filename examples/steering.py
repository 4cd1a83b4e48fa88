"""Steering during generation: add a vector to the residual stream at every step.

Uses the built-in `TinyLM` (random weights, nothing downloaded). Two prompts of different
lengths share one batched generation; only the first is steered. The result is checked against
the same edit written as a plain PyTorch forward hook. Run: `python examples/steering.py`.
"""

import torch

import mediator
from mediator.models import TinyLM

torch.manual_seed(0)
net = TinyLM().eval()
model = mediator.Model(net)
prompt_a = torch.tensor([[5, 9, 13, 2, 7]])
prompt_b = torch.tensor([[11, 3, 8]])
steer = 4.0 * torch.randn(net.config.width)

with model.generate(max_new_tokens=8) as tr:
    with tr.invoke(prompt_a):  # steered
        for _ in tr.iter[:]:  # step 0: the prompt; step k: the k-th new token
            model.layers[0].output[:, -1] += steer
        steered = tr.result
    with tr.invoke(prompt_b):  # left alone, in the same batch
        untouched = tr.result

plain_a = net.generate(prompt_a, max_new_tokens=8)
plain_b = net.generate(prompt_b, max_new_tokens=8)


def add_steer(module, args, output):
    output = output.clone()
    output[:, -1] += steer
    return output


handle = net.layers[0].register_forward_hook(add_steer)
try:
    hooked_a = net.generate(prompt_a, max_new_tokens=8)
finally:
    handle.remove()

print("prompt A, unsteered:", plain_a[0, 5:].tolist())
print("prompt A, steered:  ", steered[0, 5:].tolist())
print("prompt B (same batch, not steered):", untouched[0, -8:].tolist())
same = torch.equal(steered, hooked_a) and torch.equal(untouched[:, -11:], plain_b)
print("same tokens as a plain forward hook and as a solo run:", "yes" if same else "NO")
if not same:
    raise SystemExit("steering: results differ from plain PyTorch")
