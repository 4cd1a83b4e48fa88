"""Shared fixtures: small models built in code, and checks that a trace left nothing behind."""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mediator
from mediator import _workers

ROOT = Path(__file__).resolve().parent.parent  # the repository

# Tests compare thread counts and the pool's size across traces: no idle worker may end meanwhile
# (tests of the idle time use pools of their own).
_workers.POOL.idle_timeout = 3600.0


class MLP(nn.Module):
    """`depth` Linear blocks with ReLU, used by most tests."""

    def __init__(self, depth: int = 4, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Meeting(nn.Module):
    """Identity; while `barrier` (a threading.Barrier) is set, each forward waits here until all
    parties arrived, so the forwards of several threads are inside their traces at once."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier: threading.Barrier | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.barrier is not None:
            self.barrier.wait()
        return x


def hook_count(module: nn.Module) -> int:
    """Every hook registered on `module` and its submodules, of every kind."""
    total = 0
    for sub in module.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(sub, name, {}))
    return total


def patched_forwards(module: nn.Module) -> list[str]:
    """Paths of submodules that carry an instance attribute `forward` (a leftover tap)."""
    return [path for path, sub in module.named_modules() if "forward" in sub.__dict__]


def busy_workers() -> list[threading.Thread]:
    """Mediator worker threads running a job (handed one, and not done with it)."""
    return _workers.POOL.busy_threads()


def assert_untouched(*modules: nn.Module, hooks: int = 0) -> None:
    """No mediator worker busy, no tap left on `modules`, and `hooks` PyTorch hooks in all."""
    assert busy_workers() == [], "a mediator thread is still running trace code"
    for module in modules:
        assert patched_forwards(module) == [], "a tap was left on the model"
    assert sum(hook_count(module) for module in modules) == hooks


def tiny_gpt2(seed: int, **config: Any) -> nn.Module:
    """A config-built GPT-2 (2 layers, 32 wide, 2 heads, 100 tokens, unless `config` says
    otherwise) in eval mode, its weights drawn from `seed`; skips without `transformers`."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    options = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, **config}
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**options)).eval()


WORDS = ["<pad>", "<eos>", "<unk>", *(f"w{i}" for i in range(97))]  # `word_tokenizer`'s vocabulary


def word_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` over `WORDS`, one token per word ("w5"; any other word is
    "<unk>"), with an end-of-sequence token and no pad token; built here, nothing downloaded."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    core = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>")
    )
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths `AutoModelForCausalLM.from_pretrained` is called with from now on."""
    transformers = pytest.importorskip("transformers")
    calls: list[str] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def counted(where: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(where)
        return original(where, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", counted)
    return calls


def tiny_llama(seed: int, **config: Any) -> nn.Module:
    """A config-built Llama (2 layers, 32 wide, 2 heads and 2 key/value heads, 100 tokens,
    unless `config` says otherwise) in eval mode, its weights drawn from `seed`."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    options = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        **config,
    }
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**options)).eval()


@pytest.fixture
def net() -> Iterator[MLP]:
    """A 4-layer MLP; after the test it must carry no tap."""
    torch.manual_seed(0)
    module = MLP()
    yield module
    assert patched_forwards(module) == [], "a tap was left on the model"


@pytest.fixture
def model(net: MLP) -> mediator.Model:
    return mediator.Model(net)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 8)


@pytest.fixture(autouse=True)
def no_busy_worker() -> Iterator[None]:
    """After every test: no mediator worker still running trace code."""
    yield
    gc.collect()
    assert busy_workers() == [], "a mediator thread is still running after the test"


@pytest.fixture
def sigint_ready() -> None:
    """Skip unless a SIGINT sent to the main thread reaches Python's default handler there."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("Ctrl-C reaches the main thread only")
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not handled by Python's default handler here")
    if not hasattr(signal, "pthread_kill"):
        pytest.skip("needs signal.pthread_kill")
