"""`orpo score`: held-out pairs through the base, the trained adapter and its GGUF."""

from __future__ import annotations

import json
import subprocess

import pytest
from test_cli import BIN, _env


def _score(*args, cwd=None):
    return subprocess.run(
        [str(BIN / "orpo"), "score", *map(str, args)], env=_env(), capture_output=True, text=True, timeout=900, cwd=cwd
    )


def test_training_raises_preference_accuracy_on_held_out_pairs(trained_tiny, tmp_path):
    gguf = trained_tiny["gguf"]
    report_path = tmp_path / "report.json"
    proc = _score(
        trained_tiny["base"],
        trained_tiny["adapter"],
        gguf / "model-q8_0.gguf",
        "--pairs",
        trained_tiny["eval"],
        "--limit",
        "100",
        "--report",
        report_path,
        cwd=trained_tiny["adapter"].parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(report_path.read_text())
    base, adapter, q8 = report["models"]
    assert [m["kind"] for m in report["models"]] == ["hf", "adapter", "gguf"]
    assert base["pairs"] == adapter["pairs"] == q8["pairs"] == 100
    assert adapter["accuracy"] > base["accuracy"] + 0.2, (base["accuracy"], adapter["accuracy"])
    assert q8["accuracy"] > base["accuracy"] + 0.2, (base["accuracy"], q8["accuracy"])
    assert adapter["mean_log_odds_ratio"] > base["mean_log_odds_ratio"]
    # Agreement with the first model, and accuracy, recomputed from each pair's average log-probs.
    for model in (adapter, q8):
        prefers = [(r["chosen"]["avg_logprob"] > r["rejected"]["avg_logprob"]) for r in model["results"]]
        firsts = [(r["chosen"]["avg_logprob"] > r["rejected"]["avg_logprob"]) for r in base["results"]]
        assert model["agreement"] == pytest.approx(sum(a == b for a, b in zip(prefers, firsts)) / 100)
        assert model["accuracy"] == pytest.approx(sum(prefers) / 100)
    assert adapter["agreement"] < 1.0  # training changed some preferences: the check can tell
    # The q8_0 file prefers what the model it came from prefers (same pairs, same tokenization).
    same = sum(a["preferred"] == b["preferred"] for a, b in zip(adapter["results"], q8["results"])) / 100
    assert same >= 0.95
    assert "| model | pairs | accuracy | mean margin | mean log-odds ratio | agreement with first |" in proc.stdout
    assert f"| {gguf / 'model-q8_0.gguf'} | 100 | {q8['accuracy']:.3f} |" in proc.stdout


def test_bad_pairs_file_and_bad_model_are_one_line_errors(trained_tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": 5, "rejected": "b"}\n')
    proc = _score(trained_tiny["base"], "--pairs", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        f"{bad} row 1 (line 2): field 'chosen': expected a string, got int. Fix the row, or pass "
        f"--on-bad-row skip" in proc.stderr
    )
    proc = _score(tmp_path, "--pairs", trained_tiny["eval"])
    assert proc.returncode == 1 and "not a GGUF file, an adapter directory" in proc.stderr


def test_parquet_pairs_score_like_the_same_jsonl(trained_tiny, tmp_path):
    """Local Parquet files are read by the core (through `datasets`), as training reads them."""
    from datasets import Dataset

    rows = [json.loads(line) for line in trained_tiny["eval"].read_text().splitlines()[:5]]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    reports = {}
    for name in ("pairs.parquet", "pairs.jsonl"):
        if name.endswith(".jsonl"):
            (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        proc = _score(
            trained_tiny["gguf"] / "model-q8_0.gguf", "--pairs", tmp_path / name, "--report", tmp_path / f"{name}.json"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())["models"][0]["results"]
    assert reports["pairs.parquet"] == reports["pairs.jsonl"] and len(reports["pairs.jsonl"]) == 5
