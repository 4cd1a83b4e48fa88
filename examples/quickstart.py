"""Quickstart: read and edit a model's activations while it runs.

Uses the built-in induction model (a 2-layer transformer shipped with the package, trained to
continue repeated random sequences; nothing is downloaded). Reads where its heads look, ablates
them, and patches one prompt's activation into another in one batched forward pass, checking
every result against plain PyTorch hooks. Run: `python examples/quickstart.py`.
"""

import torch

import mediator
from mediator.models import induction_prompts, load_induction, repeated_tokens

net = load_induction()
model = mediator.Model(net)
ids = repeated_tokens(1, 8, generator=torch.Generator().manual_seed(0))  # BOS, r_1..r_8 twice
first, second = (" ".join(map(str, half.tolist())) for half in (ids[0, 1:9], ids[0, 9:]))
print(f"prompt: BOS | {first} | {second}")
repeat = slice(9, 16)  # positions 9..15 hold r_1..r_7 again and should predict r_2..r_8

# 1. Read: the body runs while the model does, and its names stay bound afterwards.
with torch.no_grad(), model.trace(ids):
    pattern = model.layers[1].attn.pattern.output  # [batch, head, query, key]
    logits = model.output
right = (logits[0, repeat].argmax(-1) == ids[0, 10:]).sum()
looks_at = pattern[0, :, -1].argmax(-1).tolist()  # where each head looks from the last token
print(
    f"1. read: {right}/7 tokens of the repeat predicted; from the last token, layer 1's heads "
    f"look at positions {looks_at}: just after where that token first occurred (position 8)"
)

# 2. Ablate: zero the outputs of layer 1's heads (an in-place edit of the real tensor).
with torch.no_grad(), model.trace(ids):
    model.layers[1].attn.heads.output[:] = 0  # [batch, position, head, head_width]
    ablated = model.output
right = (ablated[0, repeat].argmax(-1) == ids[0, 10:]).sum()
print(f"2. ablate: with layer 1's heads zeroed, {right}/7 tokens of the repeat predicted")

# 3. Patch: three invokes share one batched forward. The prompt is cut inside the repeat, and in
# its corrupted copy r_4 is replaced where it first occurs, so the model cannot look up what
# followed it. The third invoke takes layer 0's output at the next position, where layer 0 wrote
# "r_4 came before me", from the clean invoke.
clean, corrupt, answer = induction_prompts(1, 8, 4, generator=torch.Generator().manual_seed(1))
with torch.no_grad(), model.trace() as tr:
    with tr.invoke(clean):  # BOS, r_1..r_8, r_1..r_4: the answer is r_5
        clean_h = model.layers[0].output
    with tr.invoke(corrupt):
        corrupt_logits = model.output
    with tr.invoke(corrupt):
        model.layers[0].output[:, 5] = clean_h[:, 5]  # waits for the clean invoke to bind clean_h
        patched_logits = model.output
print(
    f"3. patch: the answer is {answer.item()}; with r_4 replaced where it first occurs the model "
    f"predicts {corrupt_logits[0, -1].argmax().item()}, and "
    f"{patched_logits[0, -1].argmax().item()} with layer 0's output at position 5 patched from "
    "the clean invoke"
)

# 4. The same with plain PyTorch hooks, to show nothing is approximated.
seen = {}
handle = net.layers[1].attn.pattern.register_forward_hook(lambda m, a, o: seen.setdefault("p", o))
expected_logits = net(ids)
handle.remove()
handle = net.layers[1].attn.heads.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
expected_ablated = net(ids)
handle.remove()
handle = net.layers[0].register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
net(clean)
handle.remove()


def patch_position_5(module, args, output):
    output = output.clone()
    output[:, 5] = seen["h"][:, 5]
    return output


handle = net.layers[0].register_forward_hook(patch_position_5)
expected_patched = net(corrupt)
handle.remove()
checks = {
    "read": torch.equal(pattern, seen["p"]) and torch.equal(logits, expected_logits),
    "ablate": torch.allclose(ablated, expected_ablated),
    "patch": torch.allclose(patched_logits, expected_patched, atol=1e-5),
}
print(
    "4. same as plain hooks:", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
)
if not all(checks.values()):
    raise SystemExit("quickstart: a result differs from plain PyTorch hooks")
