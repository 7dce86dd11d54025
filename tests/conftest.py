"""Shared fixtures: everything is built locally, once per test session."""

from __future__ import annotations

import os

from orpo_demo.env import OFFLINE

for _key, _value in {**OFFLINE, "CUDA_VISIBLE_DEVICES": ""}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny.build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """One saved random model per fixture architecture: llama (GQA, untied), llama-tied,
    mistral, qwen2 (biases, tied), qwen3 (Q/K norms, explicit head_dim)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ("llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3", "mistral-window"):
        dirs[arch] = root / arch
        tiny.build_model(arch, dirs[arch], tokenizer=tokenizer)
    return dirs


@pytest.fixture(scope="session")
def tiny_default(tmp_path_factory):
    """The embedded default of example_configs/tiny-cpu.yml (model + data)."""
    return tiny.build_default(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def fresh_plugins():
    """Axolotl's PluginManager is a process-wide singleton: reset it around a test."""
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    yield
    PluginManager._instance = None


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_default):
    """The embedded default trained briefly through `axolotl train` and exported through
    `axolotl merge-and-quantize` (f16 and q8_0): {"base", "adapter", "gguf"} paths."""
    from test_cli import _axolotl, _tiny_config, _train

    root = tmp_path_factory.mktemp("trained")
    config = _tiny_config(root, tiny_default, max_steps=150, test_datasets=None, eval_steps=None, save_strategy="no")
    _train(config, "--launcher", "python")
    proc = _axolotl("merge-and-quantize", config, "--quant", "f16", "--quant", "q8_0", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "base": tiny_default / "model",
        "adapter": root / "out",
        "gguf": root / "out" / "gguf",
        "eval": tiny_default / "data" / "eval.jsonl",
    }
