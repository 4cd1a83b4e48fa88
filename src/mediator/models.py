"""Small built-in models for examples and tests, with no dependency beyond torch.

`TinyLM` is a decoder-only transformer (token and position embeddings, pre-norm blocks of causal
self-attention and an MLP, a language-model head) with a greedy `generate` in the style of
Hugging Face: `model.generate(input_ids, attention_mask=None, max_new_tokens=n)` returns the
prompt followed by the new tokens, and left padding is handled through the attention mask. Each
attention layer names its attention weights and its heads' outputs as identity submodules, so
head-level reads and edits are one line:

    model = mediator.Model(mediator.models.TinyLM())
    with model.trace(ids):
        pattern = model.layers[0].attn.pattern.output    # [batch, head, query, key]
        model.layers[1].attn.heads.output[:, :, 2] = 0   # [batch, position, head, head_width]

`load_induction()` returns a trained one, shipped with the package (186 KiB, nothing to
download): the default model of the examples.

The induction model
-------------------
Two attention-only layers (no MLPs), width 64, 4 heads of width 16, 64 tokens (token 0 is BOS),
64 positions: 45,952 parameters. `examples/train_induction.py` trained it (1,500 steps of AdamW,
batches of 64, about 40 s on one CPU core) on sequences `[BOS, r_1..r_n, r_1..r_n]` of distinct
random tokens (`repeated_tokens`), n from 4 to 31, with the loss on the repeated half only. There
the next token can only be found by looking up the earlier occurrence of the current token and
copying the one after it, and the model does exactly that. Running the script again gives the
same file bit for bit (checked on the machine that made it; another CPU or torch build may differ
in the last bits of some float operations). Measured on fresh sequences with n = 20
(`tests/api/test_models.py` measures every number again):

- next-token accuracy: 1.000 on the repeated half; 0.001 on the first half, where nothing can be
  known (chance: 1/63 = 0.016); 0.967 on the repeat of the longest sequences (n = 31).
- layer 0, head 2 is the previous-token head: from each token of the first half it gives 0.95 of
  its attention to the token just before (heads 0, 1 and 3: 0.47, 0.57 and 0.17). It does so only
  as far as the task needed it, up to position 30; hence the 0.967 for n = 31.
- all four heads of layer 1 are induction heads: from each token of the repeat they give 0.96,
  0.92, 0.81 and 0.97 of their attention to the token after that token's earlier occurrence.
- zeroing layer 0 head 2 drops the repeat's accuracy to 0.59 (with heads 0 and 1 too: 0.07);
  zeroing any one head of layer 1 changes nothing (>= 0.999), all four: 0.017.

This is the two-step circuit of induction heads. The previous-token head writes "the token before
me was r_i" into the residual stream at the position of r_(i+1); at a later r_i, the induction
heads look for exactly that, attend to the position of r_(i+1) and copy its token to the output.
`examples/activation_patching.py` shows it (`examples/patching.png`): in prompts `BOS r1..r10
r1..r6` with the earlier r6 corrupted, the answer r7 comes back in full by patching the embedding at
the corrupted position, the output of layer 0 one position later (r7, where the previous-token head
wrote "r6 was before me"), or the output of layer 1 at the last position; among heads, by layer 0
head 2 alone (0.93), and in part by each induction head (0.36, 0.31, 0.13, 0.53).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

INDUCTION_WEIGHTS = Path(__file__).resolve().parent / "weights" / "induction.pt"
PREVIOUS_TOKEN_HEAD = (0, 2)  # (layer, head) of the induction model's previous-token head
INDUCTION_HEADS = ((1, 0), (1, 1), (1, 2), (1, 3))  # and of its induction heads


@dataclass
class TinyLMConfig:
    """Sizes of a `TinyLM` (the defaults make the small random model the tests use).

    Example:

        config = TinyLMConfig(layers=2, width=64, heads=4, mlp=False)  # attention-only
        net = TinyLM(config)
    """

    vocab_size: int = 64
    width: int = 32
    heads: int = 4
    layers: int = 2
    max_positions: int = 128
    pad_token_id: int = 0
    bos_token_id: int | None = None
    mlp: bool = True  # False: attention-only blocks (no `ln2`, no `mlp`)


class Attention(nn.Module):
    """Causal multi-head self-attention that ignores masked (padding) positions.

    Two identity submodules name its inner values, so they can be read and set like any output:
    `pattern` (the attention weights, `[batch, head, query, key]`) and `heads` (each head's
    output before the output projection `out`, `[batch, position, head, head_width]`).

    Example:

        with model.trace(ids):
            pattern = model.layers[0].attn.pattern.output   # where each head looks
            model.layers[1].attn.heads.output[:, :, 3] = 0   # ablate head 3 of layer 1
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.pattern = nn.Identity()
        self.heads = nn.Identity()
        self.out = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of `x` `[batch, length, width]` over the positions `mask` allows
        (`[batch, query, key]`, True where a query may look), projected back to `width`.

        Example:

            mask = torch.ones(1, 5, 5, dtype=torch.bool).tril()   # causal
            out = net.layers[0].attn(torch.randn(1, 5, net.config.width), mask)
        """
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (width // self.n_heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        pattern = self.pattern(torch.softmax(scores, dim=-1).nan_to_num(0.0))
        heads: torch.Tensor = self.heads((pattern @ v).transpose(1, 2))
        return self.out(heads.reshape(batch, length, width))  # type: ignore[no-any-return]


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)) unless the config has `mlp=False`.

    Example:

        with model.trace(ids):
            resid = model.layers[1].input      # the residual stream entering block 1
            after = model.layers[1].output     # and leaving it
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = Attention(config)
        self.ln2: nn.LayerNorm | None = None
        self.mlp: nn.Sequential | None = None
        if config.mlp:
            self.ln2 = nn.LayerNorm(config.width)
            self.mlp = nn.Sequential(
                nn.Linear(config.width, 4 * config.width),
                nn.GELU(),
                nn.Linear(4 * config.width, config.width),
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The residual stream `x` after this block; `mask` as for `Attention.forward`.

        Example:

            mask = torch.ones(1, 5, 5, dtype=torch.bool).tril()
            out = net.layers[0](torch.randn(1, 5, net.config.width), mask)
        """
        x = x + self.attn(self.ln1(x), mask)
        if self.mlp is not None and self.ln2 is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class TinyLM(nn.Module):
    """A small decoder-only language model with a greedy `generate`.

    Children: `embed`, `position`, `layers` (each a `Block` with `ln1`, `attn` and, unless
    `mlp=False`, `ln2` and `mlp`), `ln_f`, `lm_head`.

    Example:

        net = TinyLM().eval()                 # random weights; load_induction() for trained ones
        model = mediator.Model(net)
        with model.trace(torch.tensor([[1, 2, 3]])):
            logits = model.lm_head.output     # [1, 3, vocab_size]
    """

    def __init__(self, config: TinyLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyLMConfig()
        c = self.config
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.position = nn.Embedding(c.max_positions, c.width)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.lm_head = nn.Linear(c.width, c.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `[batch, length, vocab]` for every position. Padding is marked by zeros in
        `attention_mask`; positions count from each sequence's first real token by default.

        Example:

            logits = net(torch.tensor([[0, 5, 9]]))                 # [1, 3, vocab_size]
            padded = net(torch.tensor([[0, 0, 5]]), attention_mask=torch.tensor([[0, 1, 1]]))
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        mask = causal[None] & attention_mask.bool()[:, None, :]
        x = self.embed(input_ids) + self.position(position_ids)
        for layer in self.layers:
            x = layer(x, mask)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 8,
    ) -> torch.Tensor:
        """Greedy decoding: the prompt followed by `max_new_tokens` tokens. Each step runs the
        model over the whole sequence (no cache), so step k is the k-th call of every module.

        Example:

            tokens = net.generate(torch.tensor([[0, 5, 9]]), max_new_tokens=4)   # [1, 7]
            with model.generate(torch.tensor([[0, 5, 9]]), max_new_tokens=4) as tr:
                for step in tr.iter[:]:
                    model.layers[0].output[:, -1] += steer
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for _ in range(max_new_tokens):
            logits = self(input_ids, attention_mask=attention_mask)
            token = logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        return input_ids


def repeated_tokens(
    count: int,
    length: int,
    *,
    vocab_size: int = 64,
    bos_token_id: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`count` sequences `[BOS, r_1..r_length, r_1..r_length]`, shape `[count, 1 + 2 * length]`:
    the data `load_induction()` was trained on. The `r_i` of a sequence are distinct random tokens
    other than BOS (so `length < vocab_size`), and each token of the repeat has exactly one earlier
    occurrence, whose successor is the next token.

    Example:

        ids = repeated_tokens(2, 5, generator=torch.Generator().manual_seed(0))
        ids.shape                                  # (2, 11): BOS, r_1..r_5, r_1..r_5
        torch.equal(ids[:, 1:6], ids[:, 6:])       # True
    """
    if not 0 < length < vocab_size:
        raise ValueError(f"length must be in 1..{vocab_size - 1}, got {length}")
    half = torch.rand(count, vocab_size - 1, generator=generator).argsort(-1)[:, :length]
    half += half >= bos_token_id  # every token but BOS
    bos = torch.full((count, 1), bos_token_id, dtype=half.dtype)
    return torch.cat([bos, half, half], dim=1)


def induction_prompts(
    count: int, length: int, cut: int, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(clean, corrupt, answer)` for patching experiments on the induction model.

    `clean` prompts are `[BOS, r_1..r_length, r_1..r_cut]`, whose next token is the `answer`
    `r_(cut+1)`; `corrupt` ones are the same with the earlier `r_cut` (at position `cut`) replaced
    by a token found nowhere else, so the model cannot look up what followed it. Shapes
    `[count, 1 + length + cut]` and `[count]`.

    Example:

        clean, corrupt, answer = induction_prompts(8, 10, 6)   # BOS r1..r10 r1..r6 -> r7
        with model.trace() as tr:
            with tr.invoke(clean):
                h = model.layers[0].output
            with tr.invoke(corrupt):
                model.layers[0].output[:, 7] = h[:, 7]
                patched = model.output                 # predicts `answer` again
    """
    if not 0 < cut < length:
        raise ValueError(f"cut must be in 1..{length - 1}, got {cut}")
    ids = repeated_tokens(count, length + 1, generator=generator)  # one spare distinct token
    clean = torch.cat([ids[:, : length + 1], ids[:, 1 : cut + 1]], dim=1)
    corrupt = clean.clone()
    corrupt[:, cut] = ids[:, length + 1]
    return clean, corrupt, clean[:, cut + 1]


def load_induction(path: str | os.PathLike[str] = INDUCTION_WEIGHTS) -> TinyLM:
    """The built-in induction model (shipped with the package, nothing downloaded), in eval mode.

    Loaded with `torch.load(..., weights_only=True)`: the file holds only the config (plain ints
    and bools) and the state dict. `examples/train_induction.py` wrote it and reproduces it.

    Example:

        net = mediator.models.load_induction()
        ids = mediator.models.repeated_tokens(1, 10)      # [BOS, r_1..r_10, r_1..r_10]
        net(ids)[0, 11:-1].argmax(-1)                      # r_2..r_10: the repeat continued
    """
    saved = torch.load(path, weights_only=True, map_location="cpu")
    with torch.device("meta"):  # no random initialisation: the weights are assigned below
        net = TinyLM(TinyLMConfig(**saved["config"]))
    net.load_state_dict(saved["state_dict"], assign=True)
    return net.eval()
