"""Log-probabilities of target tokens from logits: one implementation for numpy arrays (llama.cpp's
logits) and torch tensors (the trainer's LM-head chunks, transformers' logits), so training,
the export check and every scorer compute log p(token) the same way."""

from __future__ import annotations

from array_api_compat import array_namespace, is_torch_namespace


def logsumexp(logits):
    """log sum exp over the last axis, with the running maximum taken out."""
    xp = array_namespace(logits)
    if is_torch_namespace(xp):
        import torch

        return torch.logsumexp(logits, dim=-1)  # one fused kernel; the max stays out of autograd
    peak = xp.max(logits, axis=-1, keepdims=True)
    return xp.log(xp.sum(xp.exp(logits - peak), axis=-1)) + peak[..., 0]


def log_softmax(logits):
    """Log-probabilities of every token: logits [..., V] -> [..., V]."""
    return logits - logsumexp(logits)[..., None]


def target_logprobs(logits, targets):
    """log softmax(logits[i])[targets[i]]: logits [N, V], integer targets [N] -> [N], in the logits'
    dtype (pass float64 to accumulate in float64), without a [N, V] log-softmax."""
    xp = array_namespace(logits, targets)
    picked = xp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logsumexp(logits)
