"""Shared fixtures: everything is built locally, once per test session."""

from __future__ import annotations

import os

for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false",
    "CUDA_VISIBLE_DEVICES": "",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

from orpo_plugin import tiny  # noqa: E402


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
    mistral, qwen2 (biases, tied)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ("llama", "llama-tied", "mistral", "qwen2"):
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
