"""Attention weights and one head's output of a Hugging Face Llama, reached with `.source`.

Attention weights and per-head outputs are computed inside a Hugging Face attention module's
`forward` by plain functions, not by modules: `.source` names each call it makes, so they can be
read and changed like module outputs. This script builds a small Llama from a config (random
weights, eager attention, nothing to download), reads layer 0's attention weights from the
attention function's output and from the softmax inside it, and ablates one head of layer 1
(the input of `o_proj` holds the heads side by side). It checks the weights against
`output_attentions=True` and the ablation against a hand-patched forward (a pre-hook on
`o_proj`), and makes the ablation a persistent edit. Run: `python examples/attention_heads.py`.
"""

import torch
import transformers

import mediator

HEADS, HEAD = 4, 2
config = transformers.LlamaConfig(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    attn_implementation="eager",
)
torch.manual_seed(0)
net = transformers.LlamaForCausalLM(config).eval()
model = mediator.Model(net)
attention = model.model.layers[0].self_attn
print(attention.source)  # the forward, each call named: attention_interface_0, o_proj_0, ...

ids = torch.randint(0, 100, (2, 8))
width = config.hidden_size // HEADS
heads = slice(HEAD * width, (HEAD + 1) * width)
with torch.no_grad(), model.trace() as tr:
    with tr.invoke(ids):
        softmax = attention.source.attention_interface_0.source.softmax_0.output
        weights = attention.source.attention_interface_0.output[1]  # (output, weights)
    with tr.invoke(ids):
        model.model.layers[1].self_attn.source.o_proj_0.input[:, :, heads] = 0
        ablated = model.output.logits

# The same with plain PyTorch: output_attentions, and a pre-hook on o_proj.
with torch.no_grad():
    expected = net(ids, output_attentions=True).attentions[0]

    def ablate(module, args):
        hidden = args[0].clone()
        hidden[:, :, heads] = 0
        return (hidden,)

    handle = net.model.layers[1].self_attn.o_proj.register_forward_pre_hook(ablate)
    try:
        hand = net(ids).logits
    finally:
        handle.remove()
    plain = net(ids).logits

with model.edit() as edited:  # the ablation, made persistent
    model.model.layers[1].self_attn.source.o_proj_0.input[:, :, heads] = 0
with torch.no_grad():
    persistent = edited(ids).logits

normalised = weights.sum(-1).allclose(torch.ones(1))
print(f"attention weights {tuple(weights.shape)}, rows sum to 1: {normalised}")
same = weights.allclose(expected) and softmax.allclose(expected)
print(f"same as output_attentions=True: {'yes' if same else 'no'}")
change = (ablated - plain).abs().max().item()
print(f"head {HEAD} of layer 1 ablated: logits move by up to {change:.3f}")
print(f"same as a hand-patched forward: {'yes' if ablated.allclose(hand) else 'no'}")
print(f"as a persistent edit: {'yes' if persistent.allclose(hand) else 'no'}")
