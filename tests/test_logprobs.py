"""Chunked log-probs equal a full log-softmax, in value and in gradient, for every path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orpo_plugin.logprobs import can_fuse, default_chunk_tokens, logit_transform, token_logprobs


def _reference(hidden, targets, head, scale=1.0, softcap=0.0):
    logits = head(hidden).float() * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


def _grads(fn, hidden, head, targets, weights):
    hidden = hidden.clone().requires_grad_()
    head.zero_grad()
    out = fn(hidden, targets, head)
    (out * weights).sum().backward()
    return out.detach(), hidden.grad, head.weight.grad.clone()


@pytest.mark.parametrize("method", ["fused", "chunked"])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_match_full_log_softmax(method, bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 301, bias=bias)
    hidden, targets = torch.randn(37, 32), torch.randint(0, 301, (37,))
    weights = torch.randn(37)  # an arbitrary per-token objective, as ORPO's is
    ref = _grads(_reference, hidden, head, targets, weights)
    got = _grads(lambda h, t, m: token_logprobs(h, t, m, chunk_tokens=8, method=method), hidden, head, targets, weights)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_chunked_path_handles_softcap_and_scale():
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 64, bias=False)
    hidden, targets = torch.randn(20, 16) * 5, torch.randint(0, 64, (20,))
    weights = torch.randn(20)
    ref = _grads(lambda h, t, m: _reference(h, t, m, scale=0.5, softcap=3.0), hidden, head, targets, weights)
    got = _grads(
        lambda h, t, m: token_logprobs(h, t, m, chunk_tokens=6, scale=0.5, softcap=3.0), hidden, head, targets, weights
    )
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert not can_fuse(head, scale=0.5)
    with pytest.raises(ValueError, match="fused"):
        token_logprobs(hidden, targets, head, softcap=3.0, method="fused")


def test_wrapped_head_uses_the_module_not_its_weight():
    """A LoRA-wrapped head must contribute its adapter: the module is called per chunk."""
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(16, 40, bias=False)

    torch.manual_seed(2)
    model = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    assert not can_fuse(head)
    hidden, targets = torch.randn(9, 16), torch.randint(0, 40, (9,))
    torch.testing.assert_close(
        token_logprobs(hidden, targets, head, chunk_tokens=4), _reference(hidden, targets, head), rtol=1e-5, atol=1e-6
    )
    plain = _reference(hidden, targets, head.base_layer)
    assert not torch.allclose(plain, _reference(hidden, targets, head))


def test_empty_selection_and_config_transforms():
    head = torch.nn.Linear(8, 10)
    assert token_logprobs(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), head).shape == (0,)
    assert default_chunk_tokens(128_000) * 128_000 <= (1 << 25)
    cfg = type("C", (), {"logit_scale": 0.25, "logits_scaling": 2.0, "final_logit_softcapping": 30.0})()
    assert logit_transform(cfg) == (0.125, 30.0)
