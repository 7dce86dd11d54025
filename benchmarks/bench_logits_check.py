"""The export's logits check on a 262,144-token vocabulary (Gemma 3 270M, tests/real_models.py):
streamed (this tree: one window of full-vocabulary log-probs per model at a time, llama.cpp in a
child process) against the check as it was before (BEFORE, a git revision: whole sequences of fp32
logits held several times over, llama.cpp in the export's own process).

Each side runs `orpo merge-and-quantize`'s export (f16) in a process of its own from its own tree;
the figures are its stage table's: seconds and peak RSS of the check stage (for this tree, this
process's peak plus its llama.cpp child's), the whole export's peak, and the mean KL both found.

Run: python benchmarks/bench_logits_check.py [--before REV]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "4400444"  # main before the streamed check (issue 29)

RUN = """
import json, sys, tempfile
sys.path.insert(0, "tests")
import real_models
from serve.export.pipeline import export
out = tempfile.mkdtemp() + "/gguf"
report = export(real_models.gemma3(), None, out, ["f16"], progress=lambda m: None)
print(json.dumps({"stages": report["stages"], "mean_kl": report["models"]["f16"]["mean_kl"]}))
"""


def measure(tree: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", RUN], cwd=tree, env=_env(tree), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"the export in {tree} failed:\n{proc.stderr[-3000:]}")
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    check = next(s for s in found["stages"] if s["stage"].startswith("check tokens"))
    return {
        "check s": check["seconds"],
        "check peak GiB": check["peak_rss_mib"] / 1024,
        "export peak GiB": max(s["peak_rss_mib"] for s in found["stages"]) / 1024,
        "mean KL": found["mean_kl"],
    }


def _env(tree: Path) -> dict:
    import os

    from orpo_demo.env import offline_env

    return dict(offline_env(), PYTHONPATH=str(tree), **{"HOME": os.environ.get("HOME", "/root")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE, help="git revision of the check to compare against")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import real_models

    real_models.gemma3()  # built once, outside both measurements
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(before), args.before], check=True)
        try:
            rows = {f"before ({args.before})": measure(before), "streamed (this tree)": measure(ROOT)}
        finally:
            subprocess.run([*git, "remove", "--force", str(before)], check=True)
    print(f"CPU: {cpu_name()}; Gemma 3 270M, f16, 262,144-token vocabulary")
    print("| check | check stage s | check stage peak GiB | export peak GiB | mean KL (f16) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        cells = f"{r['check s']:.0f} | {r['check peak GiB']:.2f} | {r['export peak GiB']:.2f} | {r['mean KL']:.3e}"
        print(f"| {name} | {cells} |")
    (old, new) = rows.values()
    print(
        f"streamed / before: time {new['check s'] / old['check s']:.2f}x, check-stage peak "
        f"{new['check peak GiB'] / old['check peak GiB']:.2f}x"
    )


if __name__ == "__main__":
    main()
