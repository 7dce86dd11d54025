"""ORPO vs SFT on the demo task: what happens to the rejected answers' log-probability.

The paper's central observation (Hong et al. 2024, Figure 3): under SFT on the chosen answers,
the rejected answers' log-probability rises along with the chosen ones; ORPO's odds-ratio term
pushes it down. Same model, same pairs, same steps and learning rate, two runs through
`axolotl train`: SFT on the chosen conversations (Axolotl's chat_template strategy) and ORPO
(rl: orpo_plugin). Held-out pairs are scored at every checkpoint with the served scorer's
tokenization; the table gives mean per-token log-probs of chosen and rejected answers.

    python benchmarks/bench_orpo_vs_sft.py [--steps 250] [--every 50] [--pairs 100] [--png PATH]
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
sys.path.insert(0, str(ROOT))


def train(kind: str, work: Path, tiny_dir: Path, steps: int, every: int) -> Path:
    from serve.demo import BIN, _env

    cfg = yaml.safe_load((ROOT / "example_configs" / "tiny-cpu.yml").read_text())
    cfg.update(base_model=str(tiny_dir / "model"), output_dir=str(work / kind), max_steps=steps,
               save_strategy="steps", save_steps=every, dataset_prepared_path=str(work / f"prepared-{kind}"),
               eval_steps=None, test_datasets=None)
    if kind == "sft":
        for key in ("plugins", "rl", "orpo_alpha"):
            cfg.pop(key)
        rows = [json.loads(line) for line in (tiny_dir / "data" / "train.jsonl").read_text().splitlines()]
        sft = work / "sft.jsonl"
        sft.write_text("".join(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]})
                               + "\n" for r in rows))
        cfg["datasets"] = [{"path": str(sft), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}]
    else:
        cfg["datasets"][0]["path"] = str(tiny_dir / "data" / "train.jsonl")
    config = work / f"{kind}.yml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([str(BIN / "axolotl"), "train", str(config), "--launcher", "python"], cwd=work, env=_env(),
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
    args = parser.parse_args(argv)
    from orpo_plugin import tiny
    from serve.evaluate import load_pairs

    with tempfile.TemporaryDirectory(prefix="orpo-vs-sft-") as work:
        work = Path(work)
        tiny_dir = tiny.build_default(work / "tiny")
        pairs = load_pairs(tiny_dir / "data" / "eval.jsonl", limit=args.pairs)
        curves = {kind: curve(tiny_dir / "model", train(kind, work, tiny_dir, args.steps, args.every), pairs)
                  for kind in ("sft", "orpo")}
    print(f"held-out pairs: {len(pairs)}; {args.steps} steps, same model, data order, learning rate and LoRA")
    print("| step | SFT chosen | SFT rejected | ORPO chosen | ORPO rejected |")
    print("|---|---|---|---|---|")
    for (step, sc, sr), (_, oc, orj) in zip(curves["sft"], curves["orpo"]):
        print(f"| {step} | {sc:.3f} | {sr:.3f} | {oc:.3f} | {orj:.3f} |")
    for kind, points in curves.items():
        (_, c0, r0), (_, c1, r1) = points[0], points[-1]
        print(f"{kind.upper()}: chosen {c0:.3f} -> {c1:.3f} ({c1 - c0:+.3f}), rejected {r0:.3f} -> {r1:.3f} "
              f"({r1 - r0:+.3f}), margin at the end {c1 - r1:+.3f}")
    plot(curves, args.png)
    print(f"wrote {args.png}")


def plot(curves, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for kind, color in (("sft", "tab:blue"), ("orpo", "tab:red")):
        steps = [p[0] for p in curves[kind]]
        ax.plot(steps, [p[1] for p in curves[kind]], "-o", color=color, label=f"{kind.upper()} chosen")
        ax.plot(steps, [p[2] for p in curves[kind]], "--o", color=color, label=f"{kind.upper()} rejected")
    ax.set_xlabel("step")
    ax.set_ylabel("mean per-token log-prob (held-out)")
    ax.set_title("ORPO vs SFT on the demo task")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
