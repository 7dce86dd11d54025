"""`make demo`: the whole job on the embedded default, through the same commands a user runs.

build the tiny model and the unit-conversion pairs -> `axolotl train` -> `axolotl
merge-and-quantize` (f16, q8_0, q4_k_m, each scored on the held-out pairs; the Modelfile on the
smallest that keeps 99% of the merged model's preference accuracy) -> `orpo serve` (one
/v1/score, one chat) -> `orpo score` on the held-out pairs for the base and the trained adapter
-> greedy answers to held-out questions -> `orpo plot` -> one summary table (also
OUT/summary.json).

    python -m orpo_demo [--out build/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from importlib import resources
from pathlib import Path

import yaml

from orpo_demo.env import BIN, offline_env
from orpo_plugin.core.atomic import write_json

QUANTS = ("f16", "q8_0", "q4_k_m")
KEEP_ACCURACY = 0.99  # of the merged model's preference accuracy, for the file the Modelfile uses
CONFIG = "tiny-cpu.yml"  # shipped in this package; example_configs/tiny-cpu.yml links to it


def _run(*args, cwd: Path, log: Path) -> str:
    """Run a CLI with its output in a log file; on failure show the log's end and stop."""
    with log.open("w") as f:
        proc = subprocess.run([str(a) for a in args], cwd=cwd, env=offline_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"demo: `{' '.join(map(str, args))}` failed; the end of {log}:\n"
                         + log.read_text()[-3000:])
    return log.read_text()


def base_config() -> dict:
    return yaml.safe_load(resources.files("orpo_demo").joinpath(CONFIG).read_text())


def write_config(out: Path, steps: int | None) -> Path:
    cfg = base_config()
    cfg["base_model"] = str(out / "tiny" / "model")
    cfg["datasets"][0]["path"] = str(out / "tiny" / "data" / "train.jsonl")
    cfg["test_datasets"][0]["path"] = str(out / "tiny" / "data" / "eval.jsonl")
    cfg["dataset_prepared_path"] = str(out / "prepared")
    cfg["output_dir"] = str(out / "output")
    if steps:
        cfg["max_steps"] = steps
        cfg["eval_steps"] = max(steps // 4, 1)
    path = out / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def serve_once(gguf: Path, pairs: list[dict], questions: list[str], log: Path) -> dict:
    """Start `orpo serve`, score held-out pairs in one batch, ask held-out questions, stop."""
    import httpx

    from orpo_demo.serving import running

    with running(gguf, "--n-ctx", "512", log=log) as url:
        score = httpx.post(f"{url}/v1/score", json={"pairs": pairs}, timeout=60)
        score.raise_for_status()
        chats = []
        for question in questions:
            chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0})
            chat.raise_for_status()
            chats.append(chat.json()["choices"][0]["message"]["content"])
    return {"pairs": pairs, "scores": score.json()["results"], "questions": questions, "chats": chats}


def greedy_answers(model: Path, kind: str, questions: list[str]) -> list[str]:
    """Greedy chat replies, through llama.cpp for a GGUF and transformers otherwise."""
    if kind == "gguf":
        from serve.llama import opened

        with opened(model, n_ctx=256) as llm:
            return [llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=24, temperature=0)
                    ["choices"][0]["message"]["content"] for q in questions]
    import torch
    from transformers import AutoTokenizer

    from serve.evaluate import open_model

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    with open_model(model) as (scorer, _):
        replies = []
        for q in questions:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                out = scorer.model.generate(input_ids=ids, max_new_tokens=24, do_sample=False,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return replies


def summary_table(models: list[dict], stages: dict[str, float]) -> str:
    rows = ["| model | preference accuracy | mean log-odds ratio | exact answers | size MiB | mean KL vs merged |",
            "|---|---|---|---|---|---|"]
    for m in models:
        size = f"{m['mib']:.2f}" if m.get("mib") is not None else "-"
        kl = f"{m['mean_kl']:.2e}" if m.get("mean_kl") is not None else "-"
        rows.append(f"| {m['name']} | {m['accuracy']:.3f} | {m['mean_log_odds_ratio']:+.3f} | "
                    f"{m['exact']:.2f} | {size} | {kl} |")
    rows += ["", "| stage | seconds |", "|---|---|"]
    rows += [f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()]
    rows.append(f"| total | {sum(stages.values()):.1f} |")
    return "\n".join(rows)


def run(out: Path, steps: int | None, eval_pairs: int, questions: int) -> dict:
    from orpo_demo import build
    from serve.plot import plot

    out.mkdir(parents=True, exist_ok=True)
    stages, logs = {}, out / "logs"
    logs.mkdir(exist_ok=True)

    def stage(name):
        print(f"demo: {name} ...", flush=True)
        stages[name] = time.perf_counter()

    def done(name):
        stages[name] = time.perf_counter() - stages[name]

    stage("build model and data")
    build.build_default(out / "tiny")
    config = write_config(out, steps)
    done("build model and data")

    stage("axolotl train")
    _run(BIN / "axolotl", "train", config, cwd=out, log=logs / "train.log")
    done("axolotl train")

    stage("axolotl merge-and-quantize")
    quant_args = [a for q in QUANTS for a in ("--quant", q)]
    # The held-out pairs are the config's test_datasets: each file's preference accuracy comes from
    # the export, and the Modelfile uses the smallest file that keeps 99% of the merged model's.
    _run(BIN / "axolotl", "merge-and-quantize", config, *quant_args, "--eval-limit", eval_pairs,
         "--keep-accuracy", KEEP_ACCURACY, "--force", cwd=out, log=logs / "export.log")
    done("axolotl merge-and-quantize")
    gguf_dir = out / "output" / "gguf"
    export = json.loads((gguf_dir / "export_report.json").read_text())

    held_out = [json.loads(line) for line in (out / "tiny" / "data" / "eval.jsonl").read_text().splitlines()]
    stage("orpo serve (score 3 pairs, 3 chats)")
    shown = held_out[:3]
    served = serve_once(gguf_dir / "model-q8_0.gguf", shown, [p["prompt"][-1]["content"] for p in shown],
                        logs / "serve.log")
    done("orpo serve (score 3 pairs, 3 chats)")

    models = [("base (untrained)", out / "tiny" / "model", "hf"), ("trained (HF + LoRA)", out / "output", "adapter")]
    stage("orpo score (base and adapter)")
    report_path = out / "score_report.json"
    _run(BIN / "orpo", "score", *[m[1] for m in models], "--pairs", out / "tiny" / "data" / "eval.jsonl",
         "--limit", eval_pairs, "--report", report_path, cwd=out, log=logs / "score.log")
    done("orpo score (base and adapter)")
    scored = json.loads(report_path.read_text())["models"]
    models += [(f"GGUF {q}", gguf_dir / f"model-{q}.gguf", "gguf") for q in QUANTS]
    scored += [export["preference"]["models"][q] for q in QUANTS]  # from the export's own check

    stage("greedy answers")
    asked = held_out[:questions]
    rows = []
    for (name, path, kind), s in zip(models, scored):
        replies = greedy_answers(path, kind, [p["prompt"][-1]["content"] for p in asked])
        exact = sum(r.strip() == p["chosen"] for r, p in zip(replies, asked)) / len(asked)
        quant = name.split()[-1] if kind == "gguf" else None
        rows.append({"name": name, "accuracy": s["accuracy"], "mean_log_odds_ratio": s["mean_log_odds_ratio"],
                     "exact": exact, "example_reply": replies[0],
                     "mib": path.stat().st_size / 2**20 if quant else None,
                     "mean_kl": export["models"][quant]["mean_kl"] if quant else None})
    done("greedy answers")

    stage("orpo plot")
    png = plot(out / "output")
    done("orpo plot")

    summary = {"models": rows, "stages_s": stages, "served": served, "plot": str(png),
               "export_failed_checks": export["failed_checks"], "modelfile_from": export["modelfile"]["from"],
               "modelfile_choice": export["preference"]["choice"], "targets": targets(rows, export)}
    write_json(out / "summary.json", summary)
    return summary


def targets(rows: list[dict], export: dict) -> dict:
    by = {r["name"]: r for r in rows}
    trained, base, q4 = by["trained (HF + LoRA)"], by["base (untrained)"], by["GGUF q4_k_m"]
    return {"trained accuracy >= 0.9": trained["accuracy"] >= 0.9,
            "base accuracy near 0.5 (0.3-0.7)": 0.3 <= base["accuracy"] <= 0.7,
            "q4_k_m keeps >= 95% of trained accuracy": q4["accuracy"] >= 0.95 * trained["accuracy"],
            "every GGUF passes the export's checks": not export["failed_checks"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build") / "demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps [default: the config's]")
    parser.add_argument("--eval-pairs", type=int, default=200, help="held-out pairs to score")
    parser.add_argument("--questions", type=int, default=50, help="held-out questions to answer greedily")
    args = parser.parse_args(argv)
    summary = run(args.out.resolve(), args.steps, args.eval_pairs, args.questions)
    served = summary["served"]
    print("\norpo serve (q8_0), POST /v1/score with 3 held-out pairs:")
    for pair, s in zip(served["pairs"], served["scores"]):
        print(f"  {pair['prompt'][-1]['content']!r}: chosen {pair['chosen']!r} avg {s['chosen']['avg_logprob']:.3f}, "
              f"rejected {pair['rejected']!r} avg {s['rejected']['avg_logprob']:.3f}, "
              f"z {s['log_odds_ratio']:+.2f} -> {s['preferred']}")
    print("POST /v1/chat/completions (greedy):")
    for question, reply in zip(served["questions"], served["chats"]):
        print(f"  {question!r} -> {reply!r}")
    print()
    print(summary_table(summary["models"], summary["stages_s"]))
    print(f"\nmerge-and-quantize --keep-accuracy {KEEP_ACCURACY}: {summary['modelfile_choice']}")
    print()
    for target, met in summary["targets"].items():
        print(f"{'met' if met else 'NOT MET'}: {target}")
    print(f"\ntraining curves: {summary['plot']}; everything in {args.out}/summary.json")


if __name__ == "__main__":
    main()
