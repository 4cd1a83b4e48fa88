"""Gradients of internal values: attribution patching of the answer's logit.

Gradient x activation attributes a logit to the activations that produced it. Here the activation
is taken relative to a baseline, the corrupted run: gradient x (clean - corrupted activation) is
the first-order estimate of what patching that activation from the clean run would restore
(attribution patching). One forward and one backward pass estimate the whole heatmap of
`examples/activation_patching.py`, which needs a forward pass per patch.

The prompts are those of activation_patching.py: `BOS r1..r10 r1..r6`, answer r7, corrupted by
replacing the earlier r6. Both runs are invokes of one trace; the gradient of the corrupted
invoke's answer logit reaches its own rows only. Checked against plain PyTorch autograd with
forward hooks. Run: `python examples/gradients.py`.
"""

import torch

import mediator
from mediator.models import induction_prompts, load_induction

LENGTH, CUT, PROMPTS = 10, 6, 32
net = load_induction()
model = mediator.Model(net)
clean, corrupt, answer = induction_prompts(
    PROMPTS, LENGTH, CUT, generator=torch.Generator().manual_seed(0)
)


def answer_logit(logits):
    """The right answer's logit at the last position, averaged over the prompts."""
    return logits[:, -1].gather(1, answer[:, None]).mean()


def activations():
    """The residual stream entering each layer and the final norm, and each layer's head outputs
    ([batch, position, head, head_width]), in the order the model computes them."""
    resid, heads = [], []
    for layer in model.layers:
        resid.append(layer.input)
        heads.append(layer.attn.heads.output)
    resid.append(model.ln_f.input)
    return resid, heads


with model.trace() as tr:
    with tr.invoke(clean):
        clean_resid, clean_heads = activations()
        clean_logit = answer_logit(model.output)
    with tr.invoke(corrupt):
        resid, heads = activations()
        for value in resid + heads:
            value.retain_grad()
        corrupt_logit = answer_logit(model.output)
corrupt_logit.backward()  # plain PyTorch: reaches the corrupted invoke's rows only


def attributions(clean_values, values, difference):
    """Gradient x (clean - corrupted activation) per (residual site, position) and per (layer,
    head), summed over the width and the prompts (the logit is their mean), as a share of the
    logit `difference` between the clean and the corrupted run."""
    (clean_resid, clean_heads), (resid, heads) = clean_values, values
    with torch.no_grad():
        by_position = [
            ((c - v) * v.grad).sum(-1).sum(0) for c, v in zip(clean_resid, resid, strict=True)
        ]
        by_head = [
            ((c - v) * v.grad).sum((1, 3)).sum(0) for c, v in zip(clean_heads, heads, strict=True)
        ]
        return torch.stack(by_position) / difference, torch.stack(by_head) / difference


by_position, by_head = attributions(
    (clean_resid, clean_heads), (resid, heads), clean_logit - corrupt_logit
)


# The same with plain PyTorch: forward hooks keep the values, in the order of `activations()`.
def plain_run(ids):
    kept = []
    handles = []
    for layer in net.layers:
        handles.append(layer.register_forward_pre_hook(lambda m, a: kept.append(a[0])))
        handles.append(layer.attn.heads.register_forward_hook(lambda m, a, o: kept.append(o)))
    handles.append(net.ln_f.register_forward_pre_hook(lambda m, a: kept.append(a[0])))
    try:
        logit = answer_logit(net(ids))
    finally:
        for handle in handles:
            handle.remove()
    return (kept[0::2], kept[1::2]), logit


plain_clean, plain_clean_logit = plain_run(clean)
plain, plain_logit = plain_run(corrupt)
for value in plain[0] + plain[1]:
    value.retain_grad()
plain_logit.backward()
expected = attributions(plain_clean, plain, plain_clean_logit - plain_logit)
same = torch.allclose(by_position, expected[0], atol=1e-4) and torch.allclose(
    by_head, expected[1], atol=1e-4
)

print(f"answer's logit: clean {clean_logit:.2f}, corrupted {corrupt_logit:.2f} ({PROMPTS} prompts)")
print("attribution patching, estimated share of the logit difference restored:")
for name, row in zip(["embeddings", "layer 0 output", "layer 1 output"], by_position, strict=True):
    top, second = row.abs().topk(2).indices.tolist()
    print(f"  {name}: position {top} {row[top]:.2f}, elsewhere at most {row[second].abs():.2f}")
for layer, row in enumerate(by_head):
    values = " ".join(f"{value:.2f}" for value in row.tolist())
    print(f"  heads of layer {layer}: {values} (strongest: head {int(row.argmax())})")
print("same as plain PyTorch autograd with forward hooks:", "yes" if same else "NO")
if not same:
    raise SystemExit("gradients: results differ from plain PyTorch")
