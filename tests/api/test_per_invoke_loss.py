"""Values without rows: an HF `loss` read by one invoke of several is that invoke's own loss.

Oracles: the same invoke run alone (a plain Hugging Face forward with the same `labels`), for
the loss value and for the gradients of `loss.backward()` on parameters and on a read
activation. A batch-reduced scalar the library cannot compute per invoke (a 0-dim output of a
model that is not a causal LM) warns with `RowlessValueWarning`; an invoke without inputs gets
the whole batch's value, equal to a plain forward of the whole batch.
"""

# ruff: noqa: F841

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import assert_untouched, tiny_gpt2, tiny_llama
from torch import nn

import mediator

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2() -> nn.Module:
    return tiny_gpt2(31, n_positions=64)


def _llama() -> nn.Module:
    return tiny_llama(32)


@pytest.fixture(params=["gpt2", "llama"])
def lm(request):
    net = _gpt2() if request.param == "gpt2" else _llama()
    yield net
    assert_untouched(net)


@pytest.fixture
def texts():
    torch.manual_seed(33)
    return torch.randint(1, 100, (2, 7)), torch.randint(1, 100, (1, 4))


def first_block(net: nn.Module) -> nn.Module:
    return net.transformer.h[0] if hasattr(net, "transformer") else net.model.layers[0]


def block_envoy(model: mediator.Model, net: nn.Module) -> Any:
    return model.transformer.h[0] if hasattr(net, "transformer") else model.model.layers[0]


def hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def test_each_invoke_reads_its_own_loss(lm, texts):
    a, b = texts
    model = mediator.Model(lm)
    with torch.no_grad():
        solo_a, solo_b = lm(a, labels=a).loss, lm(b, labels=b).loss
        with model.trace() as tr:
            with tr.invoke(a, labels=a):
                loss_a = model.output.loss
            with tr.invoke(b, labels=b):
                loss_b = model.output.loss
            with tr.invoke():
                whole = model.output.loss
    torch.testing.assert_close(loss_a, solo_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_b, solo_b, atol=1e-5, rtol=0)
    # the empty invoke and tr.result keep the batch's loss: the mean over every labelled token
    assert torch.equal(tr.result.loss, whole)
    count_a, count_b = a.numel() - a.shape[0], b.numel() - b.shape[0]
    batch_mean = (solo_a * count_a + solo_b * count_b) / (count_a + count_b)
    torch.testing.assert_close(whole, batch_mean, atol=1e-5, rtol=0)


def test_own_loss_with_own_padding_and_ignored_labels(lm, texts):
    """An invoke's own left padding and -100 labels count as they do alone."""
    a, b = texts
    mask = torch.ones_like(a)
    mask[1, :3] = 0
    labels = a.masked_fill(mask == 0, -100)
    labels[0, 2] = -100
    model = mediator.Model(lm)
    with torch.no_grad():
        solo = lm(a, attention_mask=mask, labels=labels).loss
        with model.trace() as tr:
            with tr.invoke(b, labels=b):
                other = model.output.loss
            with tr.invoke(a, attention_mask=mask, labels=labels):
                own = model.output.loss
    torch.testing.assert_close(own, solo, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("labelled_first", [False, True])
def test_invoke_without_labels_reads_no_loss(lm, texts, grad, labelled_first):
    """With grad on, the outputs are merged back: an unlabelled invoke's view (no loss) must
    still line up with the batch's output (which has one)."""
    a, b = texts
    model = mediator.Model(lm)
    with torch.set_grad_enabled(grad):
        solo_loss, solo_logits = lm(b, labels=b).loss, lm(a).logits
        with model.trace() as tr:
            if labelled_first:
                with tr.invoke(b, labels=b):
                    labelled = model.output.loss
            with tr.invoke(a):
                unlabelled = model.output.loss
                logits = model.output.logits
            if not labelled_first:
                with tr.invoke(b, labels=b):
                    labelled = model.output.loss
    assert unlabelled is None and lm(a).loss is None
    torch.testing.assert_close(labelled, solo_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[:, -a.shape[1] :], solo_logits, atol=1e-5, rtol=0)


def test_backward_of_own_loss_gives_solo_gradients(lm, texts):
    a, b = texts
    model = mediator.Model(lm)
    block = first_block(lm)
    kept: list[torch.Tensor] = []
    handle = block.register_forward_hook(lambda m, i, o: kept.append(hidden(o)))
    try:
        lm.zero_grad()
        kept[:0] = []
        solo = lm(b, labels=b).loss
        kept[0].retain_grad()
        solo.backward()
    finally:
        handle.remove()
    solo_hidden_grad = kept[0].grad
    solo_grads = {name: p.grad.clone() for name, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    envoy = block_envoy(model, lm)
    with model.trace() as tr:
        with tr.invoke(a, labels=a):
            other = model.output.loss
        with tr.invoke(b, labels=b):
            h = hidden(envoy.output)
            h.retain_grad()
            own = model.output.loss
            own.backward()
    torch.testing.assert_close(own, solo, atol=1e-5, rtol=0)
    longest = a.shape[1]
    torch.testing.assert_close(
        h.grad[:, longest - b.shape[1] :], solo_hidden_grad, atol=1e-6, rtol=0
    )
    assert h.grad[:, : longest - b.shape[1]].abs().max() < 1e-8  # padding takes no part
    for name, p in lm.named_parameters():
        if name in solo_grads:
            torch.testing.assert_close(p.grad, solo_grads[name], atol=1e-5, rtol=1e-4)
    lm.zero_grad()


class Regressor(nn.Module):
    """A model that returns its predictions and the batch's mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.linear(x)
        return prediction, ((prediction - y) ** 2).mean()


def test_batch_reduced_scalar_read_by_one_invoke_warns():
    torch.manual_seed(34)
    net = Regressor()
    model = mediator.Model(net)
    x1, y1, x2, y2 = torch.randn(2, 4), torch.randn(2, 1), torch.randn(3, 4), torch.randn(3, 1)
    with pytest.warns(mediator.RowlessValueWarning, match=r"rows 0:2 \(of 5\).*no batch rows"):
        with model.trace() as tr:
            with tr.invoke(x1, y1):
                prediction, loss = model.output
            with tr.invoke(x2, y2):
                pass
    # the value it got is the batch's, as the warning says, not its own
    with torch.no_grad():
        whole = net(torch.cat([x1, x2]), torch.cat([y1, y2]))[1]
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(prediction, net(x1, y1)[0])


def test_batch_reduced_scalar_in_empty_or_single_invoke_does_not_warn():
    torch.manual_seed(35)
    net = Regressor()
    model = mediator.Model(net)
    x1, y1, x2, y2 = torch.randn(2, 4), torch.randn(2, 1), torch.randn(3, 4), torch.randn(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mediator.RowlessValueWarning)
        with model.trace(x1, y1):
            alone = model.output[1]
        with model.trace() as tr:
            with tr.invoke(x1, y1):
                pass
            with tr.invoke(x2, y2):
                pass
            with tr.invoke():
                whole = model.output[1]
    torch.testing.assert_close(alone, net(x1, y1)[1])
    torch.testing.assert_close(whole, net(torch.cat([x1, x2]), torch.cat([y1, y2]))[1])
