"""`orpo` start-up: wall time of `orpo --help`, `orpo serve --help` and `import serve.cli`, and which
heavy packages each imports, for this tree and for an earlier revision (default: the last commit
before the one-way restructure), side by side in one run with the same interpreter.

    python benchmarks/bench_cli.py [--before REV] [--runs 7]

The earlier revision is checked out into a temporary git worktree and put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "4fdbd8f"  # the last commit before issue 11's restructure
HEAVY = ("torch", "axolotl", "transformers", "gguf", "llama_cpp")
CASES = {
    "orpo --help": "import sys; sys.argv = ['orpo', '--help']; from serve.cli import main; main()",
    "orpo serve --help": "import sys; sys.argv = ['orpo', 'serve', '--help']; from serve.cli import main; main()",
    "import serve.cli": "import serve.cli",
}


def measure(tree: Path, code: str, runs: int) -> dict:
    from orpo_demo.env import offline_env

    env = dict(offline_env(), PYTHONPATH=str(tree))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0,):
            raise SystemExit(f"{tree}: {code!r} failed:\n{proc.stderr[-2000:]}")
    traced = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=tree, env=env, capture_output=True, text=True
    )
    imported = {m.split(".")[0] for m in re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", traced.stderr, re.M)}
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"s": statistics.median(times), "heavy": [h for h in HEAVY if h in imported], "stderr_lines": len(warnings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orpo-bench-cli-") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(old), args.before], cwd=ROOT, check=True, capture_output=True
        )
        try:
            rows = [
                (name, measure(old, code, args.runs), measure(ROOT, code, args.runs)) for name, code in CASES.items()
            ]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    print(
        f"| command | before ({args.before}) s | after s | after / before | heavy imports before | "
        f"heavy imports after | stderr lines before | after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, before, after in rows:
        print(
            f"| `{name}` | {before['s']:.2f} | {after['s']:.2f} | {after['s'] / before['s']:.2f} | "
            f"{', '.join(before['heavy']) or 'none'} | {', '.join(after['heavy']) or 'none'} | "
            f"{before['stderr_lines']} | {after['stderr_lines']} |"
        )


if __name__ == "__main__":
    main()
