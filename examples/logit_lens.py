"""The logit lens: what would the model predict if it stopped after each layer?

Reads the residual stream entering each layer and the final norm of the built-in induction model,
and decodes each with the model's own final norm and unembedding: `model.lm_head(model.ln_f(h))`,
plain calls from inside the trace. On the repeat of repeated random sequences, the output of
layer 0 already decodes to the previous token (the previous-token head wrote it there), and only
layer 1 (the induction heads) writes the next one. Checked against plain forward hooks.
Run: `python examples/logit_lens.py`.
"""

import torch

import mediator
from mediator.models import load_induction, repeated_tokens

LENGTH = 10
net = load_induction()
model = mediator.Model(net)
ids = repeated_tokens(64, LENGTH, generator=torch.Generator().manual_seed(0))
sites = {"embeddings": model.layers[0], "layer 0": model.layers[1], "layer 1": model.ln_f}

with torch.no_grad(), model.trace(ids):
    # the residual stream entering each site, decoded as if it were the last layer's output
    lens = {name: model.lm_head(model.ln_f(site.input)) for name, site in sites.items()}

# The same with plain forward pre-hooks.
seen = []
handles = [
    net.get_submodule(site.path).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for site in sites.values()
]
with torch.no_grad():
    net(ids)
for handle in handles:
    handle.remove()
with torch.no_grad():
    expected = [net.lm_head(net.ln_f(h)) for h in seen]
same = all(torch.equal(got, want) for got, want in zip(lens.values(), expected, strict=True))

repeat = slice(LENGTH + 1, 2 * LENGTH)  # r1..r9 of the repeat: the next token is known
print(f"top prediction on the repeat ({ids.shape[0]} sequences of {LENGTH} tokens, twice):")
for name, logits in lens.items():
    predicted = logits[:, repeat].argmax(-1)
    is_next = (predicted == ids[:, LENGTH + 2 :]).float().mean()
    is_previous = (predicted == ids[:, LENGTH : 2 * LENGTH - 1]).float().mean()
    print(f"  after {name:<10}  the next token {is_next:.2f}, the previous token {is_previous:.2f}")
print("same as plain forward hooks:", "yes" if same else "NO")
if not same:
    raise SystemExit("logit_lens: results differ from plain PyTorch hooks")
