"""`axolotl train` through the real CLI on CPU (several ranks and engines: test_engines.py)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import METRICS

from orpo_demo.env import BIN, offline_env

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(offline_env(), AXOLOTL_METRIC_NDIGITS="12")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _tiny_config(tmp_path: Path, tiny_dir: Path, **overrides) -> Path:
    """example_configs/tiny-cpu.yml pointed at a freshly built tiny model."""
    cfg = yaml.safe_load((ROOT / "example_configs" / "tiny-cpu.yml").read_text())
    cfg["base_model"] = str(tiny_dir / "model")
    cfg["datasets"][0]["path"] = str(tiny_dir / "data" / "train.jsonl")
    cfg["test_datasets"][0]["path"] = str(tiny_dir / "data" / "eval.jsonl")
    cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
    cfg["output_dir"] = str(tmp_path / "out")
    cfg.update(overrides)
    if cfg.get("adapter") is None:
        for key in [k for k in cfg if k.startswith("lora_")]:
            del cfg[key]
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _axolotl(command: str, config: Path, *args: str, cwd: Path | None = None, timeout: int = 600):
    """`axolotl COMMAND CONFIG ARGS...` in the offline environment, from cwd (default: the config's folder)."""
    return subprocess.run(
        [str(BIN / "axolotl"), command, str(config), *args],
        cwd=cwd or config.parent,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train(config: Path, *launcher: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = _axolotl("train", config, *launcher, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _log_history(out_dir: Path) -> list[dict]:
    states = sorted(out_dir.glob("checkpoint-*/trainer_state.json"))
    assert states, f"no checkpoint under {out_dir}"
    return json.loads(states[-1].read_text())["log_history"]


def test_axolotl_train_example_config(tmp_path, tiny_default):
    config = _tiny_config(
        tmp_path, tiny_default, max_steps=10, logging_steps=5, eval_steps=10, save_strategy="steps", save_steps=10
    )
    _train(config)  # Axolotl's default launcher (accelerate)
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    history = _log_history(out)
    train_logs = [h for h in history if "loss" in h]
    eval_logs = [h for h in history if "eval_loss" in h]
    assert train_logs and eval_logs
    for key in METRICS:
        assert all(key in h for h in train_logs), key
        assert all(f"eval_{key}" in h for h in eval_logs), key
    # Axolotl logs exp(loss) as ppl; the plugin logs the chosen answers' perplexity there.
    for prefix, logs in (("", train_logs), ("eval_", eval_logs)):
        for h in logs:
            assert h[f"{prefix}ppl"] == pytest.approx(math.exp(h[f"{prefix}nll_loss"]), rel=1e-6)
            assert h[f"{prefix}ppl"] != pytest.approx(math.exp(h[f"{prefix}loss"]), rel=1e-6)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]  # it learns


def test_preprocess_then_train_with_every_format(tmp_path, tiny_default):
    """One entry per format (TRL strings, messages, one assistant message, UltraFeedback, conversations, Orca
    question, mapped columns) through `axolotl preprocess` and `axolotl train`."""
    from test_datasets import FIELD_MAP, ROWS_BY_FORMAT

    entries = []
    for n, (name, golden) in enumerate(ROWS_BY_FORMAT.items()):
        text = json.dumps(golden)
        rows = [
            text.replace("2 + 3", f"{i} + 3").replace("= 6", f"= {200 + i}").replace("= 5", f"= {100 + i}")
            for i in range(8)
        ]
        path = tmp_path / f"format{n}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        entry = {"path": str(path), "ds_type": "json", "type": "orpo_plugin.preference"}
        if name == "mapped columns":
            entry.update({f"field_{k}": v for k, v in FIELD_MAP.items()})
        entries.append(entry)
    config = _tiny_config(
        tmp_path,
        tiny_default,
        datasets=entries,
        test_datasets=None,
        eval_steps=None,
        val_set_size=0.0,
        max_steps=2,
        micro_batch_size=4,
    )
    pre = _axolotl("preprocess", config, cwd=tmp_path)
    assert pre.returncode == 0, pre.stdout[-3000:]
    expected = ["prompt", "prompt", "prompt", "prompt", "conversation", "question", "prompt"]
    for n, fmt in enumerate(expected):
        assert f"format{n}.jsonl [{fmt}]: 8 rows -> 8 pairs" in pre.stdout, pre.stdout[-3000:]
    assert list((tmp_path / "prepared" / "orpo_plugin").glob("*/train"))
    run = _train(config, "--launcher", "python")
    assert "orpo_plugin: loading prepared pairs" in run.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_bad_row_exits_nonzero_with_one_message_and_no_traceback(tmp_path, tiny_default):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": "Q", "chosen": "A"}\n')
    config = _tiny_config(
        tmp_path,
        tiny_default,
        test_datasets=None,
        eval_steps=None,
        datasets=[{"path": str(data), "ds_type": "json", "type": "orpo_plugin.preference"}],
    )
    proc = _axolotl("preprocess", config, cwd=tmp_path)
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert f"{data} row 1 (line 2): field 'rejected': missing field" in out
    assert "orpo_on_bad_row: skip" in out
    assert "Traceback" not in out
