"""Every Python block of README.md runs as written, on small models built here."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLP, ROOT, tiny_llama, word_tokenizer

import mediator

README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace(block: str, folder: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    if "mediator.ray" in block:  # prompts of the induction model; needs the ray extra
        pytest.importorskip("ray")
        clean, _, _ = mediator.models.induction_prompts(6, 10, 6)
        return {"prompts": list(clean[:, None])}
    if "LanguageModel(" in block:  # a tiny Llama and a word tokenizer saved to `folder`
        tiny_llama(0).save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        return {"path": str(folder), "steer": torch.randn(32)}
    if "generate(" in block or ".source" in block:
        net = mediator.models.TinyLM().eval()
        return {
            "model": mediator.Model(net),
            "input_ids": torch.tensor([[3, 1, 4, 1, 5]]),
            "steer": torch.randn(net.config.width),
            "torch": torch,
        }
    net = MLP()
    x = torch.randn(2, 8)
    return {
        "net": net,
        "model": mediator.Model(net),
        "x": x,
        "x1": x[:1],
        "x2": x[1:],
        "clean": x[:1],
        "corrupt": x[1:],
        "torch": torch,
    }


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index]
    script = tmp_path / f"readme_block_{index}.py"  # a file: with-bodies are read from source
    script.write_text(block)
    namespace = _namespace(block, tmp_path / "model")
    result = runpy.run_path(str(script), init_globals=namespace, run_name="__main__")
    if "tokens = tr.result" in block:
        assert result["tokens"].shape == (1, 10)
        assert result["stacked"].shape[0] == 1
    if "ablated = model.output" in block:  # the tour, on the bundled induction model
        answer = result["answer"]
        assert torch.equal(result["patched"][:, -1].argmax(-1), answer)
        assert not torch.equal(result["ablated"][:, -1].argmax(-1), answer)
    if "patched = net(corrupt)" in block:  # the same patch with plain hooks
        assert torch.equal(result["patched"][:, -1].argmax(-1), result["answer"])
    if "LanguageModel(" in block:  # against the same folder loaded by transformers, solo
        transformers = pytest.importorskip("transformers")
        oracle = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        ids = word_tokenizer()("The Eiffel Tower is in", return_tensors="pt").input_ids
        with torch.no_grad():
            expected = oracle(ids).logits[:, -1]
        torch.testing.assert_close(result["last"], expected)
        assert result["shape"] == result["h"].shape  # scan: the shapes a real trace gives
    if "softmax_0" in block:  # against a hook on the module the pattern passes through
        net = result["model"]._module
        seen: list[torch.Tensor] = []
        pattern = net.layers[0].attn.pattern
        handle = pattern.register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            plain = net(result["input_ids"])
        handle.remove()
        torch.testing.assert_close(result["weights"], seen[0])
        assert not torch.allclose(result["logits"], plain)  # the ablation changed the output
        zero_layer = net.layers[1].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        with torch.no_grad():
            expected = net(result["input_ids"])
        zero_layer.remove()
        assert not result["zeroed"].any()
        torch.testing.assert_close(result["edited_logits"], expected)
    if "mediator.ray" in block:
        import ray

        ray.shutdown()
        assert len(result["swept"]) == len(result["local"]) == 6
        for swept, local in zip(result["swept"], result["local"], strict=True):
            assert torch.equal(swept, local)
    if "cache = tr.cache" in block:
        assert result["h"].grad is not None
        assert len(result["cache"]["layers.0"]) == 1
