"""Activation patching: where does the induction model find the next token?

Clean prompts are repeated random sequences cut inside the repeat, `BOS r1..r10 r1..r6`: the model
answers r7 by finding the earlier r6 and copying the token after it. In the corrupted prompts that
earlier r6 is replaced by a token found nowhere else, so the lookup fails. Each patch copies one
activation from the clean run into a corrupted run and measures how much of the answer's logit
comes back (0: nothing, 1: all of it):

- the residual stream at each (layer, position): the embeddings, and the outputs of layers 0 and 1;
- the output of each head, at all positions.

The clean run, the corrupted run and every patch are invokes of ONE trace (61 invokes, one batched
forward pass). The results are checked against the same patches made with plain PyTorch hooks and
drawn as a heatmap, which needs matplotlib (`pip install -e ".[plot]"`).

    python examples/activation_patching.py --out patching.png
"""

import argparse

import matplotlib
import torch

import mediator
from mediator.models import INDUCTION_HEADS, PREVIOUS_TOKEN_HEAD, induction_prompts, load_induction

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

parser = argparse.ArgumentParser(description="Activation patching on the induction model.")
parser.add_argument("--out", default="patching.png", help="where to save the heatmap")
args = parser.parse_args()

LENGTH, CUT, PROMPTS = 10, 6, 32
net = load_induction()
model = mediator.Model(net)
# clean: BOS r1..r10 r1..r6, answer r7; corrupt: the earlier r6 replaced by a token found nowhere
clean, corrupt, answer = induction_prompts(
    PROMPTS, LENGTH, CUT, generator=torch.Generator().manual_seed(0)
)
positions, heads = clean.shape[1], net.config.heads
sites = [model.layers[0], model.layers[1], model.ln_f]  # the residual stream entering each
site_names = ["embeddings", "layer 0 output", "layer 1 output"]


def answer_logit(logits):
    """The right answer's logit at the last position, averaged over the prompts."""
    return logits[:, -1].gather(1, answer[:, None]).mean().item()


# Invokes are served in the order they were made: at each site the clean invoke stores its value
# here before any patching invoke (made after it) is handed that site's value.
clean_values = {}


def run_clean():
    for layer in model.layers:
        clean_values[layer.path] = layer.input
        clean_values[layer.attn.heads.path] = layer.attn.heads.output
    clean_values[model.ln_f.path] = model.ln_f.input
    return answer_logit(model.output)


def patch_residual(site, position):
    resid = site.input  # this invoke's rows: the corrupted prompts
    resid[:, position] = clean_values[site.path][:, position]
    return answer_logit(model.output)


def patch_head(layer, head):
    outputs = layer.attn.heads.output  # [batch, position, head, head_width]
    outputs[:, :, head] = clean_values[layer.attn.heads.path][:, :, head]
    return answer_logit(model.output)


# One invoke per patch, as a function and its arguments (`with tr.invoke(corrupt):` blocks in a
# loop work as well: each body sees the loop's variables as they were when its invoke was made).
with torch.no_grad(), model.trace() as tr:
    high = tr.invoke(clean).run(run_clean)
    low = tr.invoke(corrupt).run(lambda: answer_logit(model.output))
    by_position = [
        [tr.invoke(corrupt).run(patch_residual, site, pos) for pos in range(positions)]
        for site in sites
    ]
    by_head = [
        [tr.invoke(corrupt).run(patch_head, layer, h) for h in range(heads)]
        for layer in model.layers
    ]
high, low = high.result(), low.result()
patched_positions = torch.tensor([[f.result() for f in row] for row in by_position])
patched_heads = torch.tensor([[f.result() for f in row] for row in by_head])

# The same patches with plain PyTorch hooks, one forward pass each.
seen = {}
handles = [
    module.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0]))
    for module in (net.layers[0], net.layers[1], net.ln_f)
]
handles += [
    layer.attn.heads.register_forward_hook(lambda m, a, o: seen.__setitem__(m, o))
    for layer in net.layers
]
with torch.no_grad():
    net(clean)
for handle in handles:
    handle.remove()


def hooked(module, index, on_input):
    """The answer's logit on the corrupted prompts with `module`'s input or output at `index`
    replaced by its clean value."""

    def patch(value):
        value = value.clone()
        value[index] = seen[module][index]
        return value

    if on_input:
        handle = module.register_forward_pre_hook(lambda m, a: (patch(a[0]), *a[1:]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: patch(o))
    with torch.no_grad():
        result = answer_logit(net(corrupt))
    handle.remove()
    return result


hooked_positions = torch.tensor(
    [
        [hooked(net.get_submodule(site.path), (slice(None), p), True) for p in range(positions)]
        for site in sites
    ]
)
hooked_heads = torch.tensor(
    [
        [hooked(layer.attn.heads, (slice(None), slice(None), h), False) for h in range(heads)]
        for layer in net.layers
    ]
)
same = torch.allclose(patched_positions, hooked_positions, atol=1e-4) and torch.allclose(
    patched_heads, hooked_heads, atol=1e-4
)

# Share of the answer's logit restored, and where it is.
restored_positions = (patched_positions - low) / (high - low)
restored_heads = (patched_heads - low) / (high - low)
labels = ["BOS"] + [f"r{i}" for i in range(1, LENGTH + 1)] + [f"r{i}" for i in range(1, CUT + 1)]
labels[CUT] = f"r{CUT}*"  # the corrupted position
print(f"answer's logit: clean {high:.2f}, corrupted {low:.2f} (mean over {PROMPTS} prompts)")
for name, row in zip(site_names, restored_positions, strict=True):
    pos = int(row.argmax())
    print(f"{name}: patching position {pos} ({labels[pos]}) restores {row[pos]:.2f}")
roles = {PREVIOUS_TOKEN_HEAD: "previous-token head"} | dict.fromkeys(
    INDUCTION_HEADS, "induction head"
)
for layer, row in enumerate(restored_heads):
    head = int(row.argmax())
    role = roles.get((layer, head), "no known role")
    print(f"strongest head in layer {layer}: head {head}, restores {row[head]:.2f} ({role})")
print("same as plain forward hooks:", "yes" if same else "NO")

figure, (left, right) = plt.subplots(
    1, 2, figsize=(11, 2.6), width_ratios=[positions, heads], layout="constrained"
)
for axis, values, title in (
    (left, restored_positions, "residual stream, patched at one position"),
    (right, restored_heads, "heads, patched at all positions"),
):
    image = axis.imshow(values, cmap="RdBu", vmin=-1, vmax=1)
    axis.set_title(title, fontsize=10)
    for row, row_values in enumerate(values.tolist()):
        for column, value in enumerate(row_values):
            if abs(value) >= 0.05:
                color = "white" if abs(value) > 0.6 else "black"
                axis.text(
                    column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color
                )
left.set_xticks(range(positions), labels, fontsize=8)
left.set_yticks(range(len(sites)), site_names, fontsize=8)
right.set_xticks(range(heads), range(heads), fontsize=8)
right.set_xlabel("head", fontsize=8)
right.set_yticks(range(len(net.layers)), [f"layer {i}" for i in range(len(net.layers))], fontsize=8)
figure.colorbar(image, ax=[left, right], shrink=0.9, label="share of logit restored")
figure.suptitle(
    f"Activation patching: clean BOS r1..r{LENGTH} r1..r{CUT} -> r{CUT + 1}, corrupted at r{CUT}*",
    fontsize=11,
)
figure.savefig(args.out, dpi=100)
print("saved", args.out)
if not same:
    raise SystemExit("activation_patching: results differ from plain PyTorch hooks")
