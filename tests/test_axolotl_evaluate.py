"""Axolotl's own `axolotl evaluate` on an ORPO run: the held-out ORPO metrics training logs at an
eval step, for the config's test_datasets and the adapter training saved in output_dir.

The reference is the training run itself: its last eval step ran on the same pairs with the
weights it then saved. `orpo score` (its own scorer, float64) checks what both measure."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import yaml
from helpers import METRICS
from test_cli import BIN, _axolotl, _env, _tiny_config, _train
from test_engines import SHIM

from serve.plot import log_history


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_default):
    """12 steps of `axolotl train` (prefix sharing and packing on, as the example config leaves
    them), evaluated on the held-out pairs at the last step, the adapter saved at the end."""
    root = tmp_path_factory.mktemp("evaluate")
    # 192 held-out pairs: whole batches of 8 on one rank and on two (a partial last batch would be
    # padded with repeated pairs on two ranks, by Accelerate, in training as here)
    pairs = root / "eval.jsonl"
    pairs.write_text("".join((tiny_default / "data" / "eval.jsonl").read_text().splitlines(keepends=True)[:192]))
    config = _tiny_config(root, tiny_default, max_steps=12, eval_steps=12, logging_steps=4, save_strategy="no")
    cfg = yaml.safe_load(config.read_text())
    cfg["test_datasets"][0]["path"] = str(pairs)
    config.write_text(yaml.safe_dump(cfg))
    _train(config, "--launcher", "python")
    evals = [h for h in log_history(root / "out") if "eval_loss" in h]  # orpo_log_history.jsonl
    assert evals[-1]["step"] == 12
    return {"root": root, "config": config, "last_eval": evals[-1], "pairs": pairs}


def _summary(trained) -> dict[str, dict[str, float]]:
    """eval_summary.csv, which `axolotl evaluate` writes into output_dir: metric -> split -> value."""
    with (trained["root"] / "out" / "eval_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {r["metric"]: {k: float(v) for k, v in r.items() if k != "metric" and v != ""} for r in rows}


def _evaluate(trained, *launcher, env=None):
    (trained["root"] / "out" / "eval_summary.csv").unlink(missing_ok=True)
    proc = subprocess.run(
        [str(BIN / "axolotl"), "evaluate", str(trained["config"]), *launcher],
        cwd=trained["root"],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc, _summary(trained)


def test_axolotl_evaluate_reports_the_last_eval_steps_orpo_metrics(trained):
    proc, summary = _evaluate(trained, "--launcher", "python")
    output = proc.stdout + proc.stderr
    assert "orpo_plugin: evaluating the adapter in" in output and "SharedPairCollator" in output
    for metric in METRICS:
        assert summary[metric]["validation"] == pytest.approx(trained["last_eval"][f"eval_{metric}"], rel=1e-6), metric
        assert "training" in summary[metric], metric  # the training pairs too, as Axolotl evaluates both
    assert summary["ppl"]["validation"] == pytest.approx(trained["last_eval"]["eval_ppl"], rel=1e-6)


def test_axolotl_evaluate_agrees_with_orpo_score_on_the_same_pairs(trained):
    """Accuracy and mean log-odds ratio of the adapter on the held-out pairs, from `orpo score`'s
    own scorer (transformers, float64 log-softmax), against the evaluation's."""
    _, summary = _evaluate(trained, "--launcher", "python")
    report = trained["root"] / "score.json"
    proc = subprocess.run(
        [
            str(BIN / "orpo"),
            "score",
            str(trained["root"] / "out"),
            "--pairs",
            str(trained["pairs"]),
            "--report",
            str(report),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (adapter,) = json.loads(report.read_text())["models"]
    assert adapter["kind"] == "adapter"
    assert summary["rewards/accuracies"]["validation"] == pytest.approx(adapter["accuracy"], abs=1e-9)
    assert summary["log_odds_chosen"]["validation"] == pytest.approx(adapter["mean_log_odds_ratio"], abs=1e-4)


def test_axolotl_evaluate_on_two_ranks_sums_as_training_does(trained):
    """Two gloo CPU ranks, each evaluating its half of the pairs: the metrics summed over ranks equal
    one process's. (tests/cpu_engines keeps the ranks' models on the CPU, a device check only.)"""
    env = dict(_env(), PYTHONPATH=str(SHIM))
    _, summary = _evaluate(trained, "--launcher", "torchrun", "--", "--nproc_per_node", "2", env=env)
    for metric in METRICS:
        assert summary[metric]["validation"] == pytest.approx(trained["last_eval"][f"eval_{metric}"], rel=1e-5), metric


def test_axolotl_evaluate_without_a_trained_adapter_says_so_in_one_line(tmp_path, tiny_default):
    config = _tiny_config(tmp_path, tiny_default)
    proc = _axolotl("evaluate", config, "--launcher", "python", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no trained adapter in output_dir {tmp_path / 'out'}" in proc.stdout + proc.stderr
