"""RoPE as config.json describes it -> GGUF metadata (and, for Llama 3's scaling, a tensor).

Checkpoints on the hub carry `rope_theta` and `rope_scaling`; transformers 5 saves the same as
`rope_parameters`. Each scaling type is one row of SCALINGS; an unknown type stops the export
with a message instead of writing a model that drifts at long positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gguf
import numpy as np

from orpo_plugin.core.errors import OrpoError


class RopeError(OrpoError, ValueError):
    pass


def rope_parameters(config: dict) -> dict:
    """rope_theta, rope_type and the scaling parameters, from either spelling."""
    params = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    params.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def llama3_factors(params: dict, head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's scaling (what transformers' _compute_llama3_parameters
    applies to the inverse frequencies), as llama.cpp reads them from rope_freqs.weight."""
    base, factor = float(params["rope_theta"]), float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_context = float(params.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < old_context / high,
        1.0,
        np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


def _linear(writer: gguf.GGUFWriter, params: dict, head_dim: int):
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(params["factor"]))


def _yarn(writer: gguf.GGUFWriter, params: dict, head_dim: int):
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(params["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    for key, add in (
        ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
    ):
        if params.get(key) is not None:
            add(float(params[key]))


def _llama3(writer: gguf.GGUFWriter, params: dict, head_dim: int):
    return {"rope_freqs.weight": llama3_factors(params, head_dim)}


# rope_type -> writes its metadata; may return extra tensors {gguf name: float32 array}
SCALINGS: dict[str, Callable[[gguf.GGUFWriter, dict, int], dict | None]] = {
    "default": lambda writer, params, head_dim: None,
    "linear": _linear,
    "yarn": _yarn,
    "llama3": _llama3,
}


def write_rope(writer: gguf.GGUFWriter, config: dict, head_dim: int, where) -> dict[str, np.ndarray]:
    """Write the RoPE keys; returns the tensors the scaling needs. Models with sliding-window layers
    (Gemma 3) give parameters per layer type: the global layers' are the model's, the sliding
    layers' own base frequency is written beside them."""
    params = rope_parameters(config)
    if isinstance(params.get("full_attention"), dict):
        sliding = params.get("sliding_attention") or {}
        params = rope_parameters({"rope_parameters": params["full_attention"]})
        if sliding.get("rope_theta"):
            writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))
    writer.add_rope_freq_base(float(params["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    scaling = SCALINGS.get(params["rope_type"])
    if scaling is None:
        raise RopeError(
            f"{where}: RoPE scaling {params['rope_type']!r} is not supported (supported: "
            f"{', '.join(SCALINGS)}); the model would lose accuracy at long positions"
        )
    return scaling(writer, params, head_dim) or {}
