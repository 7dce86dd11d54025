"""ORPO's odds-ratio math, in one place for the training loss, its metrics and served scores.

For a pair with per-token-averaged response log-probs A (chosen) and B (rejected):
    log_odds(a) = a - log(1 - e^a)
    z           = log_odds(A) - log_odds(B)          (the "log odds ratio" of Hong et al. 2024)
    L_OR        = softplus(-z) = -logsigmoid(z)
Each function takes numpy arrays or torch tensors (through the array API, so torch is never
imported for numpy input and autograd flows for tensors), computes in float32 whatever the input
dtype, and is finite for any finite input. Training and serving call the same code on the same
dtype, so a served z is the training metric's z.
"""

from __future__ import annotations

import math

from array_api_compat import array_namespace

# An average log-prob of exactly 0 makes log(1 - e^a) = -inf; keep a strictly below 0.
MAX_AVG_LOGPROB = -1e-6
_LOG_HALF = -math.log(2.0)


def _float32(x):
    xp = array_namespace(x)
    return xp, xp.astype(x, xp.float32)


def log1mexp(a):
    """log(1 - exp(a)) for a < 0, accurate everywhere (Maechler 2012): two branches, because
    each formula alone loses everything on the other side of -ln 2 in fp32."""
    xp = array_namespace(a)
    return xp.where(a > _LOG_HALF, xp.log(-xp.expm1(a)), xp.log1p(-xp.exp(a)))


def log_odds(avg_logprob):
    xp, a = _float32(avg_logprob)
    a = xp.clip(a, max=MAX_AVG_LOGPROB)
    return a - log1mexp(a)


def log_odds_ratio(chosen_avg, rejected_avg):
    """z per pair: positive when the chosen answer has the higher odds."""
    return log_odds(chosen_avg) - log_odds(rejected_avg)


def softplus(x):
    xp = array_namespace(x)
    return xp.logaddexp(xp.zeros_like(x), x)


def odds_ratio_loss(z):
    """Per-pair penalty softplus(-z) = -logsigmoid(z), minimised by making z large."""
    return softplus(-z)


def prefers_chosen(chosen_avg, rejected_avg):
    """The trainer's rewards/accuracies per pair: the chosen answer's average log-prob is higher."""
    return chosen_avg > rejected_avg


def preferred(z: float) -> str:
    return "chosen" if z > 0 else "rejected"


# Pair statistics summed over pairs; metrics are sums divided by the pair count, so they
# average exactly over gradient accumulation and ranks (a mean of means would not).
PAIR_SUMS = ("logps/chosen", "logps/rejected", "rewards/accuracies", "log_odds_ratio", "log_odds_chosen")


def pair_sums(chosen_avg, rejected_avg, z):
    """[len(PAIR_SUMS)] float32 sums over the pairs of a batch (pass detached tensors)."""
    xp = array_namespace(chosen_avg)
    a, b = xp.astype(chosen_avg, xp.float32), xp.astype(rejected_avg, xp.float32)
    wins = xp.astype(prefers_chosen(a, b), xp.float32)
    return xp.stack([xp.sum(a), xp.sum(b), xp.sum(wins), -xp.sum(odds_ratio_loss(z)), xp.sum(z)])


def metrics_from_sums(
    sums: dict[str, float], n_pairs: float, nll_sum: float, nll_tokens: float, alpha: float, prefix: str = ""
) -> dict[str, float]:
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
