"""ORPO vs SFT on a real model: what happens to the rejected answers' log-probability.

The paper's central observation (Hong et al. 2024, Figure 3): under SFT on the chosen answers,
the rejected answers' log-probability rises along with the chosen ones; ORPO's odds-ratio term
pushes it down. Here on SmolLM2-135M-Instruct and the demo's task (orpo_demo.task: one short
sentence instead of the base model's ramble). Same model, same training pairs, steps, learning
rate, LoRA and data order, two runs through `axolotl train`: SFT on the chosen conversations
(Axolotl's chat_template strategy) and ORPO (rl: orpo_plugin) at λ = 0.1 (the paper's and the
demo's) and λ = 1 (--alpha picks others). Every checkpoint scores the held-out pairs with the served scorer's
tokenization through transformers; the table gives mean per-token log-probs of the chosen and
the rejected answers, and the share of pairs whose chosen answer is the likelier.

    python benchmarks/bench_orpo_vs_sft.py [--every 2] [--alpha 0.1 ...] [--png PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def train(kind: str, alpha: float | None, work: Path, model: Path, data: dict, every: int) -> Path:
    from orpo_demo.env import BIN, offline_env
    from orpo_demo.run import base_config

    cfg = base_config()
    cfg.update(
        base_model=str(model),
        output_dir=str(work / kind),
        save_strategy="steps",
        save_steps=every,
        save_total_limit=1000,
        dataset_prepared_path=str(work / f"prepared-{kind}"),
        eval_steps=None,
        test_datasets=None,
    )
    if alpha is not None:
        cfg["orpo_alpha"] = alpha
    if kind == "sft":
        for key in ("plugins", "rl", "orpo_alpha"):
            cfg.pop(key)
        rows = [json.loads(line) for line in data["train"].read_text().splitlines()]
        sft = work / "sft.jsonl"
        sft.write_text(
            "".join(
                json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["chosen"]}]}) + "\n"
                for r in rows
            )
        )
        cfg["datasets"] = [{"path": str(sft), "ds_type": "json", "type": "chat_template", "field_messages": "messages"}]
        # Axolotl turns its LoRA kernels on for SFT by default; they need CUDA.
        cfg.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)
    else:
        cfg["datasets"][0]["path"] = str(data["train"])
    config = work / f"{kind}.yml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [str(BIN / "axolotl"), "train", str(config), "--launcher", "python"],
        cwd=work,
        env=offline_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return work / kind


def curve(base: Path, run: Path, pairs) -> list[dict]:
    from serve.scoring import open_model, score_pairs, summarize

    points = []
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for step, model in [(0, base)] + [(int(c.name.split("-")[1]), c) for c in checkpoints]:
        with open_model(model) as (scorer, tokenizer):
            results = score_pairs(scorer, tokenizer, pairs, f"score step {step}", progress=False)
        n = len(results)
        points.append(
            {
                "step": step,
                "chosen": sum(r["chosen"]["avg_logprob"] for r in results) / n,
                "rejected": sum(r["rejected"]["avg_logprob"] for r in results) / n,
                "accuracy": summarize(results)["accuracy"],
            }
        )
    return points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=2, help="score a checkpoint every N steps")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "orpo_vs_sft.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the curves here")
    parser.add_argument(
        "--alpha",
        type=float,
        action="append",
        help="ORPO's lambda (orpo_alpha); repeat for several [default: 0.1 and 1]",
    )
    args = parser.parse_args(argv)
    from orpo_demo import task
    from orpo_demo.real_model import checkpoint_from_gguf, packaged_gguf
    from orpo_plugin.core.rows import load_pairs

    runs = {"SFT": ("sft", None)} | {f"ORPO λ={a:g}": (f"orpo-{a:g}", a) for a in (args.alpha or [0.1, 1.0])}
    with tempfile.TemporaryDirectory(prefix="orpo-vs-sft-") as work:
        work = Path(work)
        model = checkpoint_from_gguf(packaged_gguf(), work / "model")
        data = task.write_data(work / "data")
        pairs = load_pairs(data["held-out"])
        curves = {
            name: curve(model, train(kind, alpha, work, model, data, args.every), pairs)
            for name, (kind, alpha) in runs.items()
        }
    steps = curves["SFT"][-1]["step"]
    print(
        f"SmolLM2-135M-Instruct, {len(pairs)} held-out pairs; {steps} steps, same model, data order, learning rate "
        f"and LoRA"
    )
    print("| step | " + " | ".join(f"{name} chosen | {name} rejected | {name} accuracy" for name in curves) + " |")
    print("|---|" + "---|---|---|" * len(curves))
    for rows in zip(*curves.values()):
        print(
            f"| {rows[0]['step']} | "
            + " | ".join(f"{p['chosen']:.3f} | {p['rejected']:.3f} | {p['accuracy']:.2f}" for p in rows)
            + " |"
        )
    for name, points in curves.items():
        first, last = points[0], points[-1]
        print(
            f"{name}: chosen {first['chosen']:.3f} -> {last['chosen']:.3f} ({last['chosen'] - first['chosen']:+.3f}), "
            f"rejected {first['rejected']:.3f} -> {last['rejected']:.3f} "
            f"({last['rejected'] - first['rejected']:+.3f}), "
            f"margin at the end {last['chosen'] - last['rejected']:+.3f}, "
            f"accuracy {first['accuracy']:.2f} -> {last['accuracy']:.2f}"
        )
    plot(curves, args.png)
    print(f"wrote {args.png}")
    if args.json:
        args.json.write_text(json.dumps(curves, indent=1))


def plot(curves, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for (name, points), color in zip(curves.items(), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        steps = [p["step"] for p in points]
        ax.plot(steps, [p["chosen"] for p in points], "-o", color=color, label=f"{name} chosen")
        ax.plot(steps, [p["rejected"] for p in points], "--o", color=color, label=f"{name} rejected")
    ax.set_xlabel("step")
    ax.set_ylabel("mean per-token log-prob (held-out pairs)")
    ax.set_title("ORPO vs SFT on SmolLM2-135M-Instruct: short answers over its own ramble")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
