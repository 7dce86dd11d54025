"""ORPO vs SFT on the demo task: what happens to the rejected answers' log-probability.

The paper's central observation (Hong et al. 2024, Figure 3): under SFT on the chosen answers,
the rejected answers' log-probability rises along with the chosen ones; ORPO's odds-ratio term
pushes it down. Same model, same pairs, same steps and learning rate, two runs through
`axolotl train`: SFT on the chosen conversations (Axolotl's chat_template strategy) and ORPO
(rl: orpo_plugin) at λ = 0.1 (the paper's and the demo's) and 1.0. Held-out pairs are scored at every checkpoint with the served scorer's
tokenization; the table gives mean per-token log-probs of chosen and rejected answers.

    python benchmarks/bench_orpo_vs_sft.py [--steps 250] [--every 50] [--pairs 100] [--alpha 0.1 ...] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def train(kind: str, alpha: float | None, work: Path, tiny_dir: Path, steps: int, every: int) -> Path:
    from orpo_demo.env import BIN, offline_env

    cfg = yaml.safe_load((ROOT / "example_configs" / "tiny-cpu.yml").read_text())
    cfg.update(base_model=str(tiny_dir / "model"), output_dir=str(work / kind), max_steps=steps,
               save_strategy="steps", save_steps=every, save_total_limit=1000,
               dataset_prepared_path=str(work / f"prepared-{kind}"),
               eval_steps=None, test_datasets=None)
    if alpha is not None:
        cfg["orpo_alpha"] = alpha
    if kind == "sft":
        for key in ("plugins", "rl", "orpo_alpha"):
            cfg.pop(key)
        rows = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()]
        sft = work / "sft.jsonl"
        sft.write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]})
                               + "\n" for r in rows))
        cfg["datasets"] = [{"path": str(sft), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}]
        # Axolotl turns its LoRA kernels on for SFT by default; they need CUDA.
        cfg.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    else:
        cfg["datasets"][0]["path"] = str(tiny_dir / "data" / "train.jsonl")
    config = work / f"{kind}.yml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([str(BIN / "axolotl"), "train", str(config), "--launcher", "python"], cwd=work, env=offline_env(),
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return work / kind


def curve(base: Path, run: Path, pairs) -> list[tuple[int, float, float]]:
    from serve.evaluate import open_model
    from serve.scoring import score_pair

    points = []
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for step, model in [(0, base)] + [(int(c.name.split("-")[1]), c) for c in checkpoints]:
        with open_model(model) as (scorer, tokenizer):
            results = [score_pair(scorer, tokenizer, p) for p in pairs]
        n = len(results)
        points.append((step, sum(r["chosen"]["avg_logprob"] for r in results) / n,
                       sum(r["rejected"]["avg_logprob"] for r in results) / n))
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "orpo_vs_sft.png")
    parser.add_argument("--alpha", type=float, action="append",
                        help="ORPO's lambda (orpo_alpha); repeat for several [default: 0.1 and 1.0]")
    args = parser.parse_args(argv)
    runs = {"SFT": ("sft", None)} | {f"ORPO λ={a:g}": (f"orpo-{a:g}", a) for a in (args.alpha or [0.1, 1.0])}
    import tiny
    from serve.evaluate import load_pairs

    with tempfile.TemporaryDirectory(prefix="orpo-vs-sft-") as work:
        work = Path(work)
        tiny_dir = tiny.build_default(work / "tiny")
        pairs = load_pairs(tiny_dir / "data" / "eval.jsonl", limit=args.pairs)
        curves = {name: curve(tiny_dir / "model", train(kind, alpha, work, tiny_dir, args.steps, args.every), pairs)
                  for name, (kind, alpha) in runs.items()}
    print(f"held-out pairs: {len(pairs)}; {args.steps} steps, same model, data order, learning rate and LoRA")
    print("| step | " + " | ".join(f"{name} chosen | {name} rejected" for name in curves) + " |")
    print("|---|" + "---|---|" * len(curves))
    for rows in zip(*curves.values()):
        print(f"| {rows[0][0]} | " + " | ".join(f"{c:.3f} | {r:.3f}" for _, c, r in rows) + " |")
    for name, points in curves.items():
        (_, c0, r0), (_, c1, r1) = points[0], points[-1]
        print(f"{name}: chosen {c0:.3f} -> {c1:.3f} ({c1 - c0:+.3f}), rejected {r0:.3f} -> {r1:.3f} "
              f"({r1 - r0:+.3f}), margin at the end {c1 - r1:+.3f}")
    plot(curves, args.png)
    print(f"wrote {args.png}")


def plot(curves, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for (name, points), color in zip(curves.items(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1] for p in points], "-o", color=color, label=f"{name} chosen")
        ax.plot(steps, [p[2] for p in points], "--o", color=color, label=f"{name} rejected")
    ax.set_xlabel("step")
    ax.set_ylabel("mean per-token log-prob (held-out)")
    ax.set_title("ORPO vs SFT on the demo task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
