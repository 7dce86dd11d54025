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

from orpo_plugin.core import registry
from orpo_plugin.core.hookspecs import hookimpl


@dataclass(frozen=True)
class Architecture:
    name: str  # as in config.json "architectures"
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # HF stores Q/K for half-rotation RoPE; llama.cpp's "llama" rotates pairs
    # Extra metadata beyond the common Llama-like hyperparameters: (writer, config.json) -> None.
    add_metadata: Callable[[gguf.GGUFWriter, dict], None] | None = None


BUILT_IN = (
    Architecture("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Architecture("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Architecture("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    # Qwen3: per-head RMSNorm on Q and K (gguf's table names them), explicit head_dim, no biases.
    Architecture("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3, permute_qk=False),
)


@hookimpl
def register_architectures(register):
    for arch in BUILT_IN:
        register(arch)


get_architectures = registry.registered("register_architectures", __name__)
