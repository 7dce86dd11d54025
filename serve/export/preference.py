"""Does each exported file still prefer what ORPO taught? Held-out pairs through the merged model
and every GGUF an export wrote, scored as `orpo score` and `/v1/score` score them (serve.scoring:
the training tokenization and core.odds), and the smallest file that keeps a share
of the merged model's preference accuracy."""

from __future__ import annotations

from pathlib import Path

from serve.export import parity
from serve.export.quantize import most_precise_first
from serve.scoring import HFScorer, open_model, score_pairs, summarize


def check(source, tokenizer, files: dict[str, Path], pairs: list, threads: int, hf=None, progress: bool = True) -> dict:
    """Preference accuracy, mean log-odds ratio, agreement with the reference and the share of the
    reference's accuracy kept, for the reference (the merged model in transformers, hf if already
    built, when it fits in memory for the logits check; else the most precise file) and each file."""
    left_out = parity.logits_left_out(source)
    runs = {}
    if left_out is None:
        reference, note = "the merged model", "in transformers, fp32"
        runs["merged"] = score_pairs(
            HFScorer(hf or parity.reference_model(source)), tokenizer, pairs, "score the merged model", progress
        )
    else:
        files = {quant: files[quant] for quant in most_precise_first(files)}
        reference, note = next(iter(files.values())).name, f"the merged model is not built: {left_out}"
    for quant, path in files.items():
        with open_model(path, threads=threads) as (scorer, gguf_tokenizer):
            runs[quant] = score_pairs(scorer, gguf_tokenizer, pairs, f"score {path.name}", progress)
    first = next(iter(runs.values()))
    models = {name: summarize(results, first) for name, results in runs.items()}
    best = next(iter(models.values()))["accuracy"]
    for summary in models.values():
        summary["kept"] = summary["accuracy"] / best if best > 0 else 1.0
    return {"pairs": len(pairs), "reference": reference, "reference_note": note, "models": models}


def choose(preference: dict, files: dict[str, dict], keep: float) -> tuple[str, str]:
    """(quant, one line) for the export report's files: the smallest that keeps at least `keep` of
    the reference's accuracy, else the one that keeps the most."""
    share = {q: preference["models"][q]["kept"] for q in files}
    keeping = [q for q in share if share[q] >= keep]
    against = f"of {preference['reference']}'s preference accuracy"
    if keeping:
        quant = min(keeping, key=lambda q: files[q]["bytes"])
        return quant, (
            f"{files[quant]['path']} is the smallest file that keeps at least {keep:.1%} {against}: "
            f"{share[quant]:.1%}; the Modelfile uses it"
        )
    quant = max(share, key=lambda q: (share[q], -files[q]["bytes"]))
    return quant, (
        f"no file keeps {keep:.1%} {against}; the best, {files[quant]['path']}, keeps "
        f"{share[quant]:.1%}, and the Modelfile uses it"
    )


def table(preference: dict, files: dict[str, dict]) -> str:
    rows = [
        f"held-out pairs: {preference['pairs']}; agreement and accuracy kept are against "
        f"{preference['reference']} ({preference['reference_note']})",
        "| model | MiB | preference accuracy | mean log-odds ratio | agreement | accuracy kept |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in preference["models"].items():
        label, mib = (files[name]["path"], f"{files[name]['bytes'] / 2**20:.1f}") if name in files else (name, "-")
        rows.append(
            f"| {label} | {mib} | {m['accuracy']:.3f} | {m['mean_log_odds_ratio']:+.4f} | "
            f"{m['agreement']:.3f} | {m['kept']:.1%} |"
        )
    return "\n".join(rows)
