"""`orpo score`: held-out preference pairs through one or more models (GGUF files, HF model
directories, or the adapter directory `axolotl train` wrote), with the training tokenization and
the training metrics' definitions."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path

from orpo_plugin.core.atomic import write_json
from orpo_plugin.core.rows import load_pairs as load_rows
from serve.llama import is_gguf
from serve.scoring import SEQUENCES, HFScorer, LlamaCppScorer, PairText, ScoreError, encode_pairs, score_packs, summarize


def load_pairs(path: str | Path, on_bad_row: str = "error", limit: int | None = None) -> list[PairText]:
    """Every dataset format training reads (detected by shape, bad rows named by line)."""
    return [PairText(p.prompt, p.chosen, p.rejected) for p in load_rows(path, on_bad_row, limit)]


def model_kind(path: str | Path) -> str:
    path = Path(path)
    if is_gguf(path):
        return "gguf"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    raise ScoreError(f"{path}: not a GGUF file, an adapter directory (adapter_config.json) or a model "
                     f"directory (config.json)")


@contextmanager
def open_model(path: str | Path, n_ctx: int = 4096, threads: int | None = None, score_batch: int | None = None):
    """(scorer, tokenizer) for a GGUF (llama.cpp; score_batch tokens per llama.cpp scoring batch) or
    an HF directory (transformers, fp32)."""
    kind = model_kind(path)
    if kind == "gguf":
        from serve.llama import opened
        from serve.scoring import GGUFTokenizer

        with opened(path, n_ctx, threads, sequences=SEQUENCES) as llm:
            yield LlamaCppScorer(llm, pack_tokens=score_batch), GGUFTokenizer(llm)
    else:
        needed = ("torch", "peft") if kind == "adapter" else ("torch",)
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise ScoreError(f"{path}: scoring a transformers model or adapter needs {' and '.join(missing)}, which "
                             f"the serve-only install leaves out; install orpo-plugin[train] (or "
                             f"{' '.join(missing)}), or score its GGUF export")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if kind == "adapter":  # what `axolotl train` wrote: its base, with the adapter applied
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        yield HFScorer(model.eval()), AutoTokenizer.from_pretrained(str(path))


def score_all(scorer, tokenizer, pairs: list[PairText], desc: str, progress: bool = True) -> list[dict]:
    """Every pair's scores on one model, in the pairs' order (batched where the scorer batches)."""
    from tqdm import tqdm

    encoded = encode_pairs(scorer, tokenizer, pairs, where=lambda i: f"pair {i + 1}")
    results = [None] * len(pairs)
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress) as bar:
        for pack, scored in score_packs(scorer, encoded):
            for i, result in zip(pack, scored):
                results[i] = result
            bar.update(len(pack))
    return results


def score_models(models: list[str], pairs: list[PairText], n_ctx: int = 4096, threads: int | None = None,
                 progress: bool = True, score_batch: int | None = None) -> dict:
    report, reference = {"pairs": len(pairs), "models": []}, None
    for model in models:
        kind = model_kind(model)
        with open_model(model, n_ctx, threads, score_batch) as (scorer, tokenizer):
            results = score_all(scorer, tokenizer, pairs, f"score {Path(model).name}", progress)
        reference = reference or results
        report["models"].append({"model": str(model), "kind": kind,
                                 **summarize(results, reference), "results": results})
    return report


def summary_table(report: dict) -> str:
    rows = ["| model | pairs | accuracy | mean margin | mean log-odds ratio | agreement with first |",
            "|---|---|---|---|---|---|"]
    for m in report["models"]:
        rows.append(f"| {m['model']} | {m['pairs']} | {m['accuracy']:.3f} | {m['mean_margin']:+.4f} | "
                    f"{m['mean_log_odds_ratio']:+.4f} | {m['agreement']:.3f} |")
    return "\n".join(rows)


def write_report(report: dict, path: str | Path) -> None:
    write_json(path, report)
