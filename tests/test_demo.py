"""`make demo`'s pipeline, shortened (fewer steps, fewer held-out pairs), so its wiring cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from test_cli import _env


def test_demo_pipeline_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "serve.demo", "--out", str(out), "--steps", "120",
                           "--eval-pairs", "60", "--questions", "10"], env=_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [m["name"] for m in summary["models"]]
    assert names == ["base (untrained)", "trained (HF + LoRA)", "GGUF f16", "GGUF q8_0", "GGUF q4_k_m"]
    by = {m["name"]: m for m in summary["models"]}
    assert by["trained (HF + LoRA)"]["accuracy"] > by["base (untrained)"]["accuracy"]
    assert by["GGUF f16"]["mean_kl"] < 1e-4 and by["GGUF q4_k_m"]["mib"] < by["GGUF f16"]["mib"]
    served = summary["served"]
    assert len(served["scores"]) == 3 and all(s["preferred"] in ("chosen", "rejected") for s in served["scores"])
    assert len(served["chats"]) == 3
    assert set(summary["stages_s"]) >= {"axolotl train", "axolotl merge-and-quantize", "orpo score", "orpo plot"}
    assert (out / "output" / "orpo_training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("| model | preference accuracy | mean log-odds ratio | exact answers |", "| total |",
                 "trained accuracy >= 0.9"):
        assert line in proc.stdout
