"""Model architectures the GGUF converter can write, registered through the `register_architectures`
hook. A third party adds one the same way these are added (see orpo_plugin/core/hookspecs.py):

    @hookimpl
    def register_architectures(register):
        register(Architecture("Phi3ForCausalLM", gguf.MODEL_ARCH.PHI3, permute_qk=False))

Tensor names come from gguf's own tensor-name tables, so a new entry needs no name mapping as
long as gguf knows the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from orpo_plugin.core import registry
from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.hookspecs import hookimpl


@dataclass(frozen=True)
class Architecture:
    name: str  # as in config.json "architectures"
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # HF stores Q/K for half-rotation RoPE; llama.cpp's "llama" rotates pairs
    # Extra metadata beyond the common Llama-like hyperparameters: (writer, config.json) -> None.
    add_metadata: Callable[[gguf.GGUFWriter, dict], None] | None = None
    # A change to a tensor's values on the way: (GGUF tensor name, float32 data) -> data.
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None


class UnsupportedConfig(OrpoError, ValueError):
    """A config.json setting that llama.cpp would run differently from transformers."""


def _gemma3_checks(config: dict) -> None:
    """What llama.cpp fixes for Gemma 3 rather than reading from the file: the query scale (by the
    number of layers: 1/sqrt(hidden/heads) for the 62-layer 27B, 1/sqrt(head_dim) otherwise), every
    sixth layer global, no attention soft-capping."""
    n_layers, heads, hidden = config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    scale_dim = hidden // heads if n_layers == 62 else head_dim
    if config.get("query_pre_attn_scalar", scale_dim) != scale_dim:
        raise UnsupportedConfig(
            f"query_pre_attn_scalar is {config['query_pre_attn_scalar']}, but llama.cpp scales "
            f"the queries of a {n_layers}-layer Gemma 3 by 1/sqrt({scale_dim}); set it to "
            f"{scale_dim} or keep the checkpoint's own value"
        )
    pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    if config.get("sliding_window") and config.get("layer_types") not in (None, pattern):
        raise UnsupportedConfig(
            "layer_types: llama.cpp runs every sixth Gemma 3 layer with global attention and "
            "the others with the sliding window; this config has another pattern"
        )
    if config.get("attn_logit_softcapping"):
        raise UnsupportedConfig(
            "attn_logit_softcapping: llama.cpp's Gemma 3 has no attention soft-capping; "
            "set it to null as Gemma 3 checkpoints do"
        )


def _gemma3_metadata(writer: gguf.GGUFWriter, config: dict) -> None:
    _gemma3_checks(config)
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _gemma_norm(name: str, data: np.ndarray) -> np.ndarray:
    """Gemma's RMSNorm scales by (1 + weight); llama.cpp's by the stored weight."""
    return data + 1.0 if name.endswith("norm.weight") else data


BUILT_IN = (
    Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    # Qwen3: per-head RMSNorm on Q and K (gguf's table names them), explicit head_dim, no biases.
    Architecture("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, permute_qk=False),
    # Gemma 3 (text): sliding-window and global layers (llama.cpp's pattern: every sixth global),
    # norms stored as (weight - 1), embeddings scaled by sqrt(hidden) inside llama.cpp.
    Architecture(
        "Gemma3ForCausalLM",
        gguf.MODEL_ARCH.GEMMA3,
        permute_qk=False,
        add_metadata=_gemma3_metadata,
        transform=_gemma_norm,
    ),
)


@hookimpl
def register_architectures(register):
    for arch in BUILT_IN:
        register(arch)


get_architectures = registry.registered("register_architectures", __name__)
