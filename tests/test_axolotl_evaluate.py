"""Axolotl's own `axolotl evaluate` on an ORPO run: the held-out ORPO metrics training logs at an
eval step, for the config's test_datasets and the adapter training saved in output_dir.

The reference is the training run itself: its last eval step ran on the same pairs with the
weights it then saved. `orpo score` (its own scorer, float64) checks what both measure."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from helpers import METRICS
from test_cli import BIN, _axolotl, _env, _log_history, _tiny_config, _train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_default):
    """12 steps of `axolotl train` (prefix sharing and packing on, as the example config leaves
    them), evaluated on the held-out pairs at the last step, the adapter saved at the end."""
    root = tmp_path_factory.mktemp("evaluate")
    config = _tiny_config(root, tiny_default, max_steps=12, eval_steps=12, logging_steps=4, save_strategy="no")
    _train(config, "--launcher", "python")
    evals = [h for h in _log_history(root / "out") if "eval_loss" in h]
    assert evals[-1]["step"] == 12
    return {"root": root, "config": config, "last_eval": evals[-1], "pairs": tiny_default / "data" / "eval.jsonl"}


def _summary(trained) -> dict[str, dict[str, float]]:
    """eval_summary.csv, which `axolotl evaluate` writes into output_dir: metric -> split -> value."""
    with (trained["root"] / "out" / "eval_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {r["metric"]: {k: float(v) for k, v in r.items() if k != "metric" and v != ""} for r in rows}


def _evaluate(trained, *launcher):
    (trained["root"] / "out" / "eval_summary.csv").unlink(missing_ok=True)
    proc = _axolotl("evaluate", trained["config"], *launcher, cwd=trained["root"])
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
    _, summary = _evaluate(trained, "--launcher", "torchrun", "--", "--nproc_per_node", "2")
    for metric in METRICS:
        assert summary[metric]["validation"] == pytest.approx(trained["last_eval"][f"eval_{metric}"], rel=1e-5), metric


def test_axolotl_evaluate_without_a_trained_adapter_says_so_in_one_line(tmp_path, tiny_default):
    config = _tiny_config(tmp_path, tiny_default)
    proc = _axolotl("evaluate", config, "--launcher", "python", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no trained adapter in output_dir {tmp_path / 'out'}" in proc.stdout + proc.stderr
