"""Steering during generation: add a vector to the residual stream at every step.

The built-in induction model continues a repeated sequence by looking up the current token's
earlier occurrence and copying what followed it. Adding the embedding of one token of the prompt
to the residual stream entering layer 1 (where the induction heads read what to look up) makes
them look up that token instead, at every step: the model then repeats its successor. Two prompts
of different lengths share one batched generation; only the first is steered. Checked against the
same edit as a plain PyTorch forward hook, and a solo run of the second prompt.
Run: `python examples/steering.py`.
"""

import torch

import mediator
from mediator.models import load_induction, repeated_tokens

NEW = 8
net = load_induction()
model = mediator.Model(net)
prompt_a = repeated_tokens(1, 8, generator=torch.Generator().manual_seed(0))[:, :12]
prompt_b = repeated_tokens(1, 5, generator=torch.Generator().manual_seed(1))[:, :8]
target = prompt_a[0, 1]  # the first token of prompt A (after BOS)
steer = 4.0 * net.embed.weight[target].detach()

with model.generate(max_new_tokens=NEW) as tr:
    with tr.invoke(prompt_a):  # steered
        for _ in tr.iter[:]:  # step 0: the prompt; step k: the k-th new token
            model.layers[0].output[:, -1] += steer
        steered = tr.result
    with tr.invoke(prompt_b):  # left alone, in the same batch
        untouched = tr.result

plain_a = net.generate(prompt_a, max_new_tokens=NEW)
plain_b = net.generate(prompt_b, max_new_tokens=NEW)


def add_steer(module, args, output):
    output = output.clone()
    output[:, -1] += steer
    return output


handle = net.layers[0].register_forward_hook(add_steer)
try:
    hooked_a = net.generate(prompt_a, max_new_tokens=NEW)
finally:
    handle.remove()

follows = prompt_a[0, 2].item()  # what followed the target in the prompt
print("prompt A:", *prompt_a[0, 1:].tolist())
print("  unsteered:", *plain_a[0, -NEW:].tolist())
print(
    f"  steered towards {target.item()}:", *steered[0, -NEW:].tolist(), f"({follows} followed it)"
)
print("prompt B:", *prompt_b[0, 1:].tolist())
print("  same batch, not steered:", *untouched[0, -NEW:].tolist())
same = torch.equal(steered, hooked_a) and torch.equal(untouched[:, -(NEW + 8) :], plain_b)
print("same tokens as a plain forward hook and as a solo run:", "yes" if same else "NO")
if not same:
    raise SystemExit("steering: results differ from plain PyTorch")
