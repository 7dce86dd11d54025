"""The plugin's config handling: `rl: orpo_plugin`, its keys, bad values, example configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orpo_plugin.args import TRAINER_CLS

ROOT = Path(__file__).resolve().parents[1]
GPU = (
    {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"},
    {"torch_version": "2.13.0"},
)


def _validate(raw: dict, capabilities=None):
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    caps, env = capabilities or (None, None)
    return validate_config(cfg, capabilities=caps, env_capabilities=env)


def _minimal(**overrides) -> dict:
    raw = {
        "base_model": "some/model",
        "plugins": ["orpo_plugin.OrpoPlugin"],
        "rl": "orpo_plugin",
        "datasets": [{"path": "prefs.jsonl", "ds_type": "json", "type": "chat_template.argilla"}],
        "sequence_len": 512,
        "micro_batch_size": 1,
        "num_epochs": 1,
        "learning_rate": 1e-5,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "output_dir": "out",
    }
    raw.update(overrides)
    return raw


def test_rl_alias_validates_as_orpo_with_our_trainer(fresh_plugins):
    cfg = _validate(_minimal())
    assert cfg.rl == "orpo"
    assert cfg.orpo_plugin is True
    assert cfg.trainer_cls == TRAINER_CLS
    assert cfg.orpo_logprob_method == "auto" and cfg.orpo_chunk_tokens is None


def test_plugin_stays_out_of_other_runs(fresh_plugins):
    """Listed but not asked for (rl: dpo, or plain SFT): no trainer swap, no settings."""
    for rl in ("dpo", None):
        cfg = _validate(
            _minimal(
                rl=rl,
                datasets=[{"path": "d.jsonl", "ds_type": "json", "type": "alpaca"}]
                if rl is None
                else [{"path": "d.jsonl", "ds_type": "json", "type": "chatml.intel"}],
            )
        )
        assert not cfg.orpo_plugin and not cfg.trainer_cls


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("orpo_alpha", -0.5, "orpo_alpha must be a number >= 0"),
        ("orpo_alpha", "lots", "orpo_alpha"),
        ("orpo_logprob_method", "fast", "'auto', 'fused' or 'chunked'"),
        ("orpo_chunk_tokens", 0, "orpo_chunk_tokens"),
        ("context_parallel_size", 2, "context_parallel_size: 2 is not supported with rl: orpo_plugin"),
        ("sequence_parallel_degree", 2, "sequence_parallel_degree: 2 is not supported with rl: orpo_plugin"),
        ("tensor_parallel_size", 2, "tensor_parallel_size: 2 is not supported with rl: orpo_plugin"),
    ],
)
def test_bad_plugin_values_name_the_key_and_the_allowed_values(key, value, expected, fresh_plugins):
    with pytest.raises(ValidationError) as err:
        _validate(_minimal(**{key: value}))
    text = str(err.value)
    assert expected in text and key in text


def test_rl_orpo_plugin_without_plugins_line_fails_as_the_readme_says(fresh_plugins):
    raw = _minimal()
    del raw["plugins"]
    with pytest.raises(ValidationError) as err:
        _validate(raw)
    message = str(err.value)
    assert "input_value='orpo_plugin'" in message and "'orpo'" in message
    readme = (ROOT / "README.md").read_text()
    assert "Input should be 'dpo', 'gdpo', 'grpo', 'ipo', 'orpo'" in readme  # shown next to the fix


def test_bf16_auto_without_cuda_falls_back_to_fp32(fresh_plugins, model_dirs):
    from axolotl.utils.config import normalize_config

    cfg = _validate(_minimal(bf16="auto", fp16=None, base_model=str(model_dirs["llama"])))
    normalize_config(cfg)
    assert cfg.bf16 is False and not cfg.fp16
    assert str(cfg.torch_dtype) == "torch.float32"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "example_configs").glob("*.yml")))
def test_example_configs_validate_against_axolotls_schema(name, fresh_plugins):
    raw = yaml.safe_load((ROOT / "example_configs" / name).read_text())
    cpu = name.endswith("-cpu.yml")  # tiny-cpu.yml, smollm2-cpu.yml (the demo's): fp32 on CPU
    cfg = _validate(raw, capabilities=None if cpu else GPU)
    assert cfg.rl == "orpo" and cfg.orpo_plugin and cfg.trainer_cls == TRAINER_CLS
    if cpu:
        assert cfg.bf16 is False and not cfg.fp16 and not cfg.tf32
    else:
        assert cfg.bf16 is True and cfg.gradient_checkpointing
    if "qlora" in name:
        assert cfg.load_in_4bit and cfg.adapter == "qlora"
    if "zero3" in name:  # Axolotl's own config, after `axolotl fetch deepspeed_configs`
        assert cfg.deepspeed == "deepspeed_configs/zero3_bf16.json"
    if "fsdp2" in name:  # full shard of the model's own decoder layer class
        import importlib

        assert cfg.fsdp_version == 2 and cfg.fsdp_config["reshard_after_forward"] is True
        layer = cfg.fsdp_config["transformer_layer_cls_to_wrap"]
        family = layer.removesuffix("DecoderLayer").lower()
        assert hasattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), layer)
