"""Small built-in models for examples and tests, with no dependency beyond torch.

`TinyLM` is a decoder-only transformer (token and position embeddings, pre-norm blocks of causal
self-attention and an MLP, a language-model head) with a greedy `generate` in the style of
Hugging Face: `model.generate(input_ids, attention_mask=None, max_new_tokens=n)` returns the
prompt followed by the new tokens, and left padding is handled through the attention mask.

    net = mediator.models.TinyLM()
    model = mediator.Model(net)
    with model.generate(ids, max_new_tokens=5) as tr:
        for step in tr.iter[:]:
            ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TinyLMConfig:
    """Sizes of a `TinyLM`."""

    vocab_size: int = 64
    width: int = 32
    heads: int = 4
    layers: int = 2
    max_positions: int = 128
    pad_token_id: int = 0


class Attention(nn.Module):
    """Causal multi-head self-attention that ignores masked (padding) positions."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (width // self.heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        mixed: torch.Tensor = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        return self.out(mixed)  # type: ignore[no-any-return]


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.width)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, 4 * config.width),
            nn.GELU(),
            nn.Linear(4 * config.width, config.width),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class TinyLM(nn.Module):
    """A small decoder-only language model with a greedy `generate`."""

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
        """Logits `[batch, length, vocab]` for every position."""
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
        model over the whole sequence (no cache), so step k is the k-th call of every module."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        for _ in range(max_new_tokens):
            logits = self(input_ids, attention_mask=attention_mask)
            token = logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        return input_ids
