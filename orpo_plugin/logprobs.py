"""Per-token log-probs at scored positions, without ever holding [tokens, vocab] logits.

ORPO's loss is a function of per-token log-probs only, so the LM head runs on the hidden
states of the positions that are scored, a chunk at a time, and is recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from orpo_plugin.core.logprobs import target_logprobs
from orpo_plugin.engines import run_as_forward

# About 64 MiB of fp32 logits per chunk: small next to activations, large enough for GEMMs.
_CHUNK_ELEMENTS = 1 << 24
_HAS_FUSED = hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")


def default_chunk_tokens(vocab_size: int) -> int:
    return max(16, _CHUNK_ELEMENTS // max(vocab_size, 1))


def logit_transform(config) -> tuple[float, float]:
    """(scale, softcap) that a model applies to lm_head's output, read from its config.
    Cohere multiplies by logit_scale, Granite divides by logits_scaling, Gemma 2/3 soft-cap."""
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = float(getattr(config, "final_logit_softcapping", None) or 0.0)
    return scale, softcap


def head_logits(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], scale: float = 1.0, softcap: float = 0.0
) -> torch.Tensor:
    """The model's logits for these hidden states, in fp32 (`head`: the LM head, or its forward)."""
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    scale: float,
    softcap: float,
) -> torch.Tensor:
    return target_logprobs(head_logits(hidden, head, scale, softcap), targets)


def can_fuse(head: nn.Module, scale: float = 1.0, softcap: float = 0.0) -> bool:
    """torch >= 2.13's chunked linear_cross_entropy handles a plain Linear head only."""
    return _HAS_FUSED and type(head) is nn.Linear and scale == 1.0 and not softcap


def token_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    *,
    chunk_tokens: int | None = None,
    scale: float = 1.0,
    softcap: float = 0.0,
    method: str = "auto",
) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) in fp32, shape [N], for hidden [N, d] and targets [N].

    method: "fused" (torch.nn.functional.linear_cross_entropy, chunked), "chunked"
    (head applied per chunk under activation checkpointing: works for any head module,
    LoRA-wrapped or quantized), or "auto" (fused where it applies).
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    # out_features before weight.shape: under ZeRO-3, reading a partitioned weight outside its
    # module's forward gathers it and registers it with the enclosing module for good.
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(vocab)
    if method == "auto":
        method = "fused" if can_fuse(head, scale, softcap) else "chunked"
    if method == "fused":
        if not can_fuse(head, scale, softcap):
            raise ValueError("the fused log-prob path needs torch>=2.13 and a plain nn.Linear head")
        # As the head's forward: ZeRO-3 gathers head.weight only while the head's forward runs.
        nll = run_as_forward(
            head,
            lambda _forward, h: F.linear_cross_entropy(
                h,
                head.weight,
                targets,
                linear_bias=head.bias,
                reduction="none",
                options=nn.LinearCrossEntropyOptions(batch_chunk_size=chunk),
            ),
            hidden,
        )
        return -nll.float()
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))

    def chunks(forward, h_all: torch.Tensor) -> torch.Tensor:
        pieces = []
        for start in range(0, h_all.shape[0], chunk):
            h, t = h_all[start : start + chunk], targets[start : start + chunk]
            if recompute:
                pieces.append(checkpoint(_chunk_logprobs, h, t, forward, scale, softcap, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(h, t, forward, scale, softcap))
        return torch.cat(pieces)

    # All chunks in one forward of the head (engines.py), each recomputed in backward through the
    # head's own forward: under ZeRO-3 the head's weight is gathered once for the forward and once,
    # by the backward hook on this output, before the recomputation reads it.
    return run_as_forward(head, chunks, hidden)
