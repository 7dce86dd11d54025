"""`make demo`'s pipeline, shortened (fewer steps, fewer held-out pairs), run from a non-editable
install of the project outside the source tree, with its figures checked as numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project as a wheel installs it (no source tree), first on sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(ROOT)], check=True, capture_output=True, env=_env(), timeout=600)
    env = dict(_env(), PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import orpo_demo, orpo_plugin, serve; "
                            "print(orpo_demo.__file__, orpo_plugin.__file__, serve.__file__)"],
                           cwd=target.parent, env=env, capture_output=True, text=True, check=True)
    assert all(path.startswith(str(target)) for path in where.stdout.split())
    return env


def test_demo_pipeline_end_to_end(tmp_path, installed):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "orpo_demo", "--out", str(out), "--steps", "120",
                           "--eval-pairs", "60", "--questions", "10"], cwd=tmp_path, env=installed,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["base (untrained)", "trained (HF + LoRA)", "GGUF f16", "GGUF q8_0", "GGUF q4_k_m"]
    by = {m["name"]: m for m in summary["models"]}
    base, trained = by["base (untrained)"], by["trained (HF + LoRA)"]
    assert 0.3 <= base["accuracy"] <= 0.7 and base["exact"] <= 0.1
    assert trained["accuracy"] >= 0.9 and trained["mean_log_odds_ratio"] > base["mean_log_odds_ratio"] + 0.25
    for quant in ("f16", "q8_0", "q4_k_m"):
        assert by[f"GGUF {quant}"]["accuracy"] >= 0.95 * trained["accuracy"], quant
    assert by["GGUF f16"]["mean_kl"] < 1e-4 and by["GGUF q4_k_m"]["mib"] < by["GGUF f16"]["mib"]
    assert summary["targets"] and all(summary["targets"].values()), summary["targets"]
    served = summary["served"]
    assert len(served["scores"]) == 3 and all(s["preferred"] in ("chosen", "rejected") for s in served["scores"])
    assert len(served["chats"]) == 3
    assert set(summary["stages_s"]) >= {"axolotl train", "axolotl merge-and-quantize", "orpo score (base and adapter)",
                                        "orpo plot"}
    # The GGUFs' accuracy comes from the export's preference check on the config's test_datasets, and
    # the Modelfile uses the smallest file keeping 99% of the merged model's accuracy.
    export = json.loads((out / "output" / "gguf" / "export_report.json").read_text())
    preference = export["preference"]
    assert preference["pairs"] == 60 and preference["reference"] == "the merged model"
    for quant in ("f16", "q8_0", "q4_k_m"):
        assert by[f"GGUF {quant}"]["accuracy"] == preference["models"][quant]["accuracy"]
    keeping = [q for q in ("f16", "q8_0", "q4_k_m") if preference["models"][q]["kept"] >= 0.99]
    smallest = min(keeping, key=lambda q: export["files"][q]["bytes"])
    assert summary["modelfile_from"] == preference["chosen"] == f"model-{smallest}.gguf"
    assert (out / "output" / "gguf" / "Modelfile").read_text().startswith(f"FROM ./model-{smallest}.gguf")
    assert (out / "output" / "orpo_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = (out / "output" / "orpo_log_history.jsonl").read_text().splitlines()
    assert len(history) == len({json.dumps(json.loads(line), sort_keys=True) for line in history})  # no repeats
    for line in ("| model | preference accuracy | mean log-odds ratio | exact answers |", "| total |",
                 "met: trained accuracy >= 0.9"):
        assert line in proc.stdout
    assert "NOT MET" not in proc.stdout
