"""Does each exported file still prefer what ORPO taught? Held-out pairs through the merged model
and every GGUF an export wrote, scored as `orpo score` and `/v1/score` score them (serve.scoring:
the training tokenization and core.odds), and the smallest file that keeps a share
of the merged model's preference accuracy."""

from __future__ import annotations

from pathlib import Path

from serve.export import parity
from serve.export.isolated import Child, LlamaAbort
from serve.export.quantize import most_precise_first
from serve.scoring import HFScorer, ScoreError, pair_ids, score_pairs, summarize

CONTEXT = 4096  # the scoring context, grown to the longest held-out pair
MARGIN = 16  # tokens a GGUF's tokenizer may add over the model's own on one pair


def preflight(tokenizer, pairs: list, limit: int | None) -> int:
    """Before anything is written: every held-out pair tokenizes as training tokenized it and fits
    the model (limit: its max_position_embeddings, when known). Returns the scoring context: the
    longest pair and a margin, at least CONTEXT, at most the limit."""
    need = 0
    for i, pair in enumerate(pairs):
        try:
            prompt, chosen, rejected = pair_ids(tokenizer, pair)
        except ScoreError as err:
            if not tokenizer.chat_template:
                raise ScoreError(
                    "the preference check scores held-out pairs through the model's chat template, and its "
                    "tokenizer has none: add one to the base (tokenizer_config.json) or leave out the pairs "
                    "(no --eval-pairs, no test_datasets)"
                ) from None
            raise ScoreError(f"held-out pair {i + 1}: {err}") from None
        tokens = len(prompt) + max(len(chosen), len(rejected))
        if limit and tokens > limit:
            raise ScoreError(
                f"held-out pair {i + 1} takes {tokens} tokens, more than the {limit} the model holds "
                f"(max_position_embeddings); shorten it, leave it out, or lower --eval-limit"
            )
        need = max(need, tokens)
    return min(max(CONTEXT, need + MARGIN), limit or float("inf"))


def check(
    source, tokenizer, files: dict[str, Path], pairs: list, threads: int, hf=None, progress: bool = True, n_ctx=CONTEXT
) -> dict:
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
    failed = {}
    for quant, path in files.items():
        try:  # in a child process: an abort in llama.cpp fails this file's check, not the export
            with Child(path) as child:
                runs[quant] = child.call("scoring", str(path), n_ctx, threads, pairs)
        except LlamaAbort as err:
            failed[quant] = {"error": str(err)}
    if not runs:
        return {"pairs": len(pairs), "reference": reference, "reference_note": note, "models": failed}
    first = next(iter(runs.values()))
    models = {name: summarize(results, first) for name, results in runs.items()}
    best = next(iter(models.values()))["accuracy"]
    for summary in models.values():
        summary["kept"] = summary["accuracy"] / best if best > 0 else 1.0
    return {"pairs": len(pairs), "reference": reference, "reference_note": note, "models": {**models, **failed}}


def choose(preference: dict, files: dict[str, dict], keep: float) -> tuple[str, str]:
    """(quant, one line) for the export report's files: the smallest that keeps at least `keep` of
    the reference's accuracy, else the one that keeps the most."""
    share = {q: preference["models"][q]["kept"] for q in files if "kept" in preference["models"][q]}
    if not share:
        quant = next(iter(files))
        return (
            quant,
            f"no file could be scored, so none was chosen by accuracy; the Modelfile uses {files[quant]['path']}",
        )
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
        if "error" in m:
            rows.append(f"| {label} | {mib} | not scored: {m['error']} | | | |")
            continue
        rows.append(
            f"| {label} | {mib} | {m['accuracy']:.3f} | {m['mean_log_odds_ratio']:+.4f} | "
            f"{m['agreement']:.3f} | {m['kept']:.1%} |"
        )
    return "\n".join(rows)
