"""The odds-ratio math: accuracy of log1mexp, finiteness at the extremes, metric names."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orpo_plugin.core import odds
from orpo_plugin.logprobs import token_logprobs

# Average log-probs a model can produce: from certain (0) to hopeless.
avg_logprob = st.one_of(
    st.floats(min_value=-1e4, max_value=0.0, allow_nan=False),
    st.sampled_from([0.0, -0.0, -1e-12, -1e-8, -1e-6, -math.log(2), -20.0, -50.0, -1e3]),
)


def _reference_log1mexp(a: float) -> float:
    return math.log(-math.expm1(a))  # float64 is exact enough for the fp32 comparison


@pytest.mark.parametrize("a", [-1e-7, -1e-4, -0.3, -math.log(2), -0.7, -5.0, -20.0, -80.0])
def test_log1mexp_matches_float64_on_both_branches(a):
    got = odds.log1mexp(torch.tensor(a, dtype=torch.float32)).item()
    assert got == pytest.approx(_reference_log1mexp(a), rel=1e-5)


def test_single_formulas_fail_where_two_branch_does_not():
    # Why two branches: each naive formula breaks on one side in fp32.
    assert torch.isinf(torch.log1p(-torch.exp(torch.tensor(-1e-8)))).item()
    assert torch.log(-torch.expm1(torch.tensor(-20.0))).item() == 0.0
    assert odds.log1mexp(torch.tensor(-20.0)).item() == pytest.approx(-2.061e-9, rel=1e-3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(avg_logprob, avg_logprob), min_size=1, max_size=8),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_loss_and_gradients_finite_for_any_avg_logprob(pairs, dtype):
    a = torch.tensor([p[0] for p in pairs], dtype=dtype, requires_grad=True)
    b = torch.tensor([p[1] for p in pairs], dtype=dtype, requires_grad=True)
    z = odds.log_odds_ratio(a, b)
    loss = odds.odds_ratio_loss(z).mean()
    loss.backward()
    assert z.dtype == torch.float32  # preference math in fp32 whatever the input dtype
    assert torch.isfinite(loss)
    assert torch.isfinite(a.grad.float()).all() and torch.isfinite(b.grad.float()).all()


@settings(max_examples=40, deadline=None)
@given(
    scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0, 3000.0]),
    seed=st.integers(0, 10_000),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    method=st.sampled_from(["fused", "chunked"]),
)
def test_extreme_logits_through_logprobs_give_finite_loss_and_grads(scale, seed, dtype, method):
    """Huge logits drive token log-probs to ~0 (confident) or far below -50 (hopeless)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(12, 16, generator=gen) * scale).to(dtype).requires_grad_()
    head = torch.nn.Linear(16, 50, bias=False).to(dtype)
    targets = torch.randint(0, 50, (12,), generator=gen)
    logp = token_logprobs(hidden, targets, head, chunk_tokens=5, method=method)
    a, b = logp[:6].mean().reshape(1), logp[6:].mean().reshape(1)
    loss = -logp[:6].mean() + 0.1 * odds.odds_ratio_loss(odds.log_odds_ratio(a, b)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(hidden.grad.float()).all()
    assert torch.isfinite(head.weight.grad.float()).all()


def test_gradient_matches_closed_form():
    # dL/dA = -s/(1-e^A), dL/dB = s/(1-e^B) with s = sigmoid(-z)  (orpo-loss notes)
    a = torch.tensor([-0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    z = odds.log_odds(a) - odds.log_odds(b)
    odds.odds_ratio_loss(z).sum().backward()
    s = torch.sigmoid(-z.detach())
    assert a.grad.item() == pytest.approx((-s / (1 - torch.exp(a.detach()))).item(), rel=1e-5)
    assert b.grad.item() == pytest.approx((s / (1 - torch.exp(b.detach()))).item(), rel=1e-5)


def test_metrics_use_trl_names_and_pair_weighted_means():
    a, b = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    z = odds.log_odds_ratio(a, b)
    sums = dict(zip(odds.PAIR_SUMS, odds.pair_sums(a, b, z).tolist()))
    m = odds.metrics_from_sums(sums, 2, nll_sum=6.0, nll_tokens=3, alpha=0.1, prefix="eval_")
    assert set(m) == {
        "eval_" + k
        for k in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "nll_loss",
            "log_odds_ratio",
            "log_odds_chosen",
        )
    }
    assert m["eval_rewards/accuracies"] == 0.5
    assert m["eval_rewards/chosen"] == pytest.approx(0.1 * -1.5)
    assert m["eval_nll_loss"] == pytest.approx(2.0)
    assert m["eval_log_odds_chosen"] == pytest.approx(z.mean().item(), rel=1e-6)
    assert odds.preferred(1.0) == "chosen" and odds.preferred(-1.0) == "rejected"
