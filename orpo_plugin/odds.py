"""ORPO's odds-ratio math, in one place for training metrics and served scores.

For a pair with per-token-averaged response log-probs A (chosen) and B (rejected):
    log_odds(a) = a - log(1 - e^a)
    z           = log_odds(A) - log_odds(B)          (the "log odds ratio" of Hong et al. 2024)
    L_OR        = softplus(-z) = -logsigmoid(z)
Everything here runs in fp32 whatever the model dtype, and is finite for any finite input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# An average log-prob of exactly 0 makes log(1 - e^a) = -inf; keep a strictly below 0.
MAX_AVG_LOGPROB = -1e-6
_LOG_HALF = -math.log(2.0)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate everywhere (Maechler 2012): two branches, because
    each formula alone loses everything on the other side of -ln 2 in fp32."""
    return torch.where(a > _LOG_HALF, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def log_odds(avg_logprob: torch.Tensor) -> torch.Tensor:
    a = avg_logprob.float().clamp(max=MAX_AVG_LOGPROB)
    return a - log1mexp(a)


def log_odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """z per pair: positive when the chosen answer has the higher odds."""
    return log_odds(chosen_avg) - log_odds(rejected_avg)


def odds_ratio_loss(z: torch.Tensor) -> torch.Tensor:
    """Per-pair penalty softplus(-z), minimised by making z large."""
    return F.softplus(-z)


def preferred(z: float) -> str:
    return "chosen" if z > 0 else "rejected"


# Pair statistics summed over pairs; metrics are sums divided by the pair count, so they
# average exactly over gradient accumulation and ranks (a mean of means would not).
PAIR_SUMS = ("logps/chosen", "logps/rejected", "rewards/accuracies", "log_odds_ratio", "log_odds_chosen")


def pair_sums(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """[len(PAIR_SUMS)] fp32 sums over the pairs of a batch (detached)."""
    a, b, z = chosen_avg.detach().float(), rejected_avg.detach().float(), z.detach().float()
    return torch.stack(
        [a.sum(), b.sum(), (a > b).float().sum(), F.logsigmoid(z).sum(), z.sum()]
    )


def metrics_from_sums(sums: dict[str, float], n_pairs: float, nll_sum: float, nll_tokens: float,
                      alpha: float, prefix: str = "") -> dict[str, float]:
    """TRL's metric names, so dashboards built for `rl: orpo` keep working."""
    n = max(n_pairs, 1.0)
    mean = {k: v / n for k, v in sums.items()}
    out = {
        "rewards/chosen": alpha * mean["logps/chosen"],
        "rewards/rejected": alpha * mean["logps/rejected"],
        "rewards/accuracies": mean["rewards/accuracies"],
        "rewards/margins": alpha * (mean["logps/chosen"] - mean["logps/rejected"]),
        "logps/chosen": mean["logps/chosen"],
        "logps/rejected": mean["logps/rejected"],
        "nll_loss": nll_sum / max(nll_tokens, 1.0),
        "log_odds_ratio": mean["log_odds_ratio"],
        "log_odds_chosen": mean["log_odds_chosen"],
    }
    return {prefix + k: v for k, v in out.items()}
