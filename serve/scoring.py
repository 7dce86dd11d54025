"""Chosen-vs-rejected scoring, the quantities the trainer logged, for a GGUF or an HF model: the
one module behind the export's preference check, `orpo score` and `/v1/score`.

A pair is tokenized by the core exactly as training tokenized it (orpo_plugin.core.tokenize: the
prompt rendered with the chat template and the generation prompt, each answer tokenized on its
own and closed by EOS), its answer tokens' log-probs come from core.logprobs, and the pair is
compared with core.odds, the code the training metrics run. With llama.cpp the shared prompt is
evaluated once per pair: its KV cache is kept and each answer is decoded on top of it, and
several pairs share one decode (LlamaCppScorer's packs).

A pair is anything with prompt, chosen and rejected (core.formats.Pair, as `orpo score` reads
them from a dataset file, or PairText, which also scores raw text). Nothing here imports torch
unless an HF model is scored.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orpo_plugin.core import odds
from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.formats import OrpoDataError
from orpo_plugin.core.logprobs import target_logprobs
from orpo_plugin.core.tokenize import tokenize_pair
from serve.llama import is_gguf

PACK_PAIRS = 64  # pairs one llama.cpp decode holds at most
SEQUENCES = 2 * PACK_PAIRS  # KV cache sequences a scoring Llama is opened with: one per answer
ROWS_AT_ONCE = 64  # logits rows widened to float64 at a time: vocabularies are large


class ScoreError(OrpoError, ValueError):
    """A request that cannot be scored; the message names the field and the fix."""


@dataclass(frozen=True)
class PairText:
    """prompt: a string (one user turn, or raw text when template is False) or chat messages."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    template: bool = True


# -- a pair as token ids, as training made them --------------------------------------------
def pair_ids(tokenizer, pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as training made them."""
    prompt = pair.prompt
    if getattr(pair, "template", True):
        if not tokenizer.chat_template:
            raise ScoreError('the model has no chat template; send "template": false to score raw text')
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
    try:
        ids, _ = tokenize_pair(tokenizer, prompt, pair.chosen, pair.rejected)
    except OrpoDataError as err:
        raise ScoreError(f"prompt: {err}") from None
    return ids["prompt_input_ids"], ids["chosen_input_ids"], ids["rejected_input_ids"]


# -- log-probs of answer tokens ---------------------------------------------------------------
def pair_tokens(prompt: list[int], chosen: list[int], rejected: list[int]) -> int:
    """Tokens (and KV cells) a pair takes when both answers sit on one prompt: the prompt, and each
    answer but its last token (whose logits nothing reads)."""
    return len(prompt) + len(chosen) + len(rejected) - 2


class Scorer:
    """One pair per pack, both answers through answer_logprobs (what a scorer without batching does)."""

    n_ctx: int

    def plan(self, pairs: list[tuple]) -> list[list[int]]:
        return [[i] for i in range(len(pairs))]

    def score_pack(self, pairs: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [tuple(self.answer_logprobs(p, [c, r])) for p, c, r in pairs]


class LlamaCppScorer(Scorer):
    """Scores on a loaded llama_cpp.Llama without its n_ctx x vocab logits buffer: decodes return
    logits for the answer rows only, consumed batch by batch.

    On a Llama opened with sequences > 1 (serve.llama.open_gguf), pairs are scored in packs: each
    pack is one KV cache's worth of whole pairs, decoded n_batch tokens per llama_decode, every
    prompt once in both of its answers' sequences. Packs hold up to pack_tokens tokens (default:
    n_batch, at most n_ctx) and n_seq_max / 2 pairs. Every cell of the cache takes part in every
    token's attention (masked where it is another sequence's), so larger packs cost more than they
    gain once a decode is full (BENCHMARKS.md). A pair whose two answers do not fit the context
    together is scored alone, one answer after the other."""

    def __init__(self, llm, pack_tokens: int | None = None):
        from serve.llama import KVCache, MultiSequence

        self.cache = KVCache(llm)
        self.n_ctx = self.cache.n_ctx
        self.multi = MultiSequence(llm)
        self.pack_tokens = min(pack_tokens or self.multi.n_batch, self.n_ctx)
        if self.multi.n_seq_max < 2:  # opened without sequences: one pair at a time
            self.multi = self.multi.close()

    def plan(self, pairs: list[tuple]) -> list[list[int]]:
        """Indices of the pairs (prompt, chosen, rejected) in each pack, in order."""
        if self.multi is None:
            return super().plan(pairs)
        packs, current, size = [], [], 0
        for i, pair in enumerate(pairs):
            tokens = pair_tokens(*pair)
            if current and (
                size + tokens > self.pack_tokens or 2 * (len(current) + 1) > self.multi.n_seq_max or tokens > self.n_ctx
            ):
                packs.append(current)
                current, size = [], 0
            current.append(i)
            size += tokens
            if tokens > self.n_ctx:  # on its own, one answer at a time
                packs.append(current)
                current, size = [], 0
        return packs + [current] if current else packs

    def score_pack(self, pairs: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(chosen, rejected) per-token log-probs of each pair of one pack (from plan)."""
        if self.multi is None or (len(pairs) == 1 and pair_tokens(*pairs[0]) > self.n_ctx):
            return super().score_pack(pairs)
        return _decode_pack(self.multi, pairs)

    def answer_logprobs(self, prompt: list[int], answers: list[list[int]], reuse_prompt: bool = True):
        """Per-token log-probs of each answer after the prompt, one answer after the other on
        sequence 0. reuse_prompt=False evaluates every full sequence from scratch (the reference
        the KV reuse is tested against)."""
        cache, out = self.cache, []
        cache.clear()
        last = cache.decode(prompt, every_row=False) if reuse_prompt else None
        for answer in answers:
            if reuse_prompt:
                cache.truncate(len(prompt))
                rows = np.concatenate([last, cache.decode(answer[:-1], every_row=True)]) if len(answer) > 1 else last
            else:
                cache.clear()
                rows = cache.decode(prompt + answer[:-1], every_row=True)[len(prompt) - 1 :]
            out.append(target_logprobs(rows.astype(np.float64), np.asarray(answer)))
        return out


def _pack_layout(pairs: list[tuple]):
    """The tokens of a pack in decode order (pair by pair: prompt in both answers' sequences 2k and
    2k + 1, then the chosen answer in 2k, the rejected in 2k + 1), which of them return logits,
    and for each answer token the logits row and token its log-prob reads."""
    tokens, pos, seqs, n_seqs, outputs, pick_row, pick_token, bounds = [], [], [], [], [], [], [], []
    row = 0
    for k, (prompt, chosen, rejected) in enumerate(pairs):
        n_p = len(prompt)
        for part, seq_ids, first in (
            (prompt, (2 * k, 2 * k + 1), 0),
            (chosen[:-1], (2 * k, 0), n_p),
            (rejected[:-1], (2 * k + 1, 0), n_p),
        ):
            is_prompt = first == 0
            tokens.append(np.asarray(part, dtype=np.int32))
            pos.append(np.arange(first, first + len(part), dtype=np.int32))
            seqs.append(np.tile(np.asarray(seq_ids, dtype=np.int32), (len(part), 1)))
            n_seqs.append(np.full(len(part), 2 if is_prompt else 1, dtype=np.int32))
            out = np.zeros(len(part), dtype=np.int8)
            out[-1 if is_prompt else slice(None)] = 1
            outputs.append(out)
        last = row  # the prompt's last row predicts each answer's first token
        rows_c = np.concatenate([[last], last + 1 + np.arange(len(chosen) - 1)])
        rows_r = np.concatenate([[last], last + len(chosen) + np.arange(len(rejected) - 1)])
        pick_row += [rows_c, rows_r]
        pick_token += [np.asarray(chosen), np.asarray(rejected)]
        bounds += [len(chosen), len(rejected)]
        row += len(chosen) + len(rejected) - 1
    cat = np.concatenate
    return (
        cat(tokens),
        cat(pos),
        cat(seqs),
        cat(n_seqs),
        cat(outputs),
        cat(pick_row).astype(np.int64),
        cat(pick_token).astype(np.int64),
        np.cumsum([0] + bounds),
    )


def _decode_pack(multi, pairs: list[tuple]) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens, pos, seqs, n_seqs, outputs, pick_row, pick_token, bounds = _pack_layout(pairs)
    picked = np.empty(len(pick_row), dtype=np.float64)
    multi.clear()
    try:
        first_row = 0
        for start in range(0, len(tokens), multi.n_batch):
            end = start + multi.n_batch
            logits = multi.decode(
                tokens[start:end], pos[start:end], seqs[start:end], n_seqs[start:end], outputs[start:end]
            )
            mine = np.flatnonzero((pick_row >= first_row) & (pick_row < first_row + len(logits)))
            for block in range(0, len(mine), ROWS_AT_ONCE):
                picks = mine[block : block + ROWS_AT_ONCE]
                rows = logits[pick_row[picks] - first_row].astype(np.float64)
                picked[picks] = target_logprobs(rows, pick_token[picks])
            first_row += len(logits)
    finally:
        multi.clear()
    answers = [picked[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]
    return list(zip(answers[0::2], answers[1::2]))


class HFScorer(Scorer):
    """Transformers reference: both full sequences in one right-padded batch, fp32."""

    def __init__(self, model):
        self.model = model
        self.n_ctx = getattr(model.config, "max_position_embeddings", None) or 10**9

    def answer_logprobs(self, prompt: list[int], answers: list[list[int]], reuse_prompt: bool = True):
        import torch

        seqs = [prompt + a for a in answers]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return [
            target_logprobs(logits[i, len(prompt) - 1 : len(prompt) + len(a) - 1].double(), torch.tensor(a)).numpy()
            for i, a in enumerate(answers)
        ]


# -- one pair, many pairs ---------------------------------------------------------------------
def _answer(logprobs: np.ndarray) -> dict:
    return {"logprob": float(logprobs.sum()), "avg_logprob": float(logprobs.mean()), "n_tokens": len(logprobs)}


def check_fits(scorer, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
    need = len(prompt) + max(len(chosen), len(rejected))
    if need > scorer.n_ctx:
        raise ScoreError(
            f"the pair needs {need} tokens (prompt {len(prompt)}, longest answer "
            f"{max(len(chosen), len(rejected))}) but the context holds {scorer.n_ctx}; "
            f"shorten it or restart with a larger --n-ctx"
        )


def pair_result(lp_chosen: np.ndarray, lp_rejected: np.ndarray) -> dict:
    c, r = _answer(lp_chosen), _answer(lp_rejected)
    z = float(odds.log_odds_ratio(np.float64(c["avg_logprob"]), np.float64(r["avg_logprob"])))
    return {"chosen": c, "rejected": r, "log_odds_ratio": z, "preferred": odds.preferred(z)}


def score_ids(scorer, prompt: list[int], chosen: list[int], rejected: list[int], reuse_prompt: bool = True) -> dict:
    """One pair on its own (the one-pair path the packs are tested against)."""
    check_fits(scorer, prompt, chosen, rejected)
    return pair_result(*scorer.answer_logprobs(prompt, [chosen, rejected], reuse_prompt=reuse_prompt))


def score_pair(scorer, tokenizer, pair, reuse_prompt: bool = True) -> dict:
    return score_ids(scorer, *pair_ids(tokenizer, pair), reuse_prompt=reuse_prompt)


def fitting_pair_ids(scorer, tokenizer, pairs: list, where=None) -> list[tuple]:
    """Each pair's ids (pair_ids), checked against the context; an error names the pair by where(i)."""
    encoded = []
    for i, pair in enumerate(pairs):
        try:
            encoded.append(pair_ids(tokenizer, pair))
            check_fits(scorer, *encoded[-1])
        except ScoreError as err:
            raise ScoreError(f"{where(i)}: {err}" if where else str(err)) from None
    return encoded


def pack_results(scorer, encoded: list[tuple], pack: list[int]) -> list[dict]:
    """The results of the pairs encoded[i] for i in one pack of scorer.plan(encoded)."""
    return [pair_result(*lps) for lps in scorer.score_pack([encoded[i] for i in pack])]


def score_packs(scorer, encoded: list[tuple]):
    """Yields (indices, results) pack by pack (scorer.plan); the server runs pack_results itself,
    one pack per turn with the model."""
    for pack in scorer.plan(encoded):
        yield pack, pack_results(scorer, encoded, pack)


def summarize(results: list[dict], reference: list[dict] | None = None) -> dict:
    """Preference accuracy (the trainer's rewards/accuracies), mean margin of average log-probs,
    mean log-odds ratio (log_odds_chosen), and, against a reference run on the same pairs, how
    often both prefer the same answer."""
    n = len(results)
    chosen = np.array([r["chosen"]["avg_logprob"] for r in results])
    rejected = np.array([r["rejected"]["avg_logprob"] for r in results])
    summary = {
        "pairs": n,
        "accuracy": float(np.mean(odds.prefers_chosen(chosen, rejected))) if n else float("nan"),
        "mean_margin": float(np.mean(chosen - rejected)) if n else float("nan"),
        "mean_log_odds_ratio": float(np.mean([r["log_odds_ratio"] for r in results])) if n else float("nan"),
    }
    if reference is not None:
        summary["agreement"] = sum(a["preferred"] == b["preferred"] for a, b in zip(results, reference)) / n
    return summary


# -- `orpo score`: files of pairs through one or more models -----------------------------------
def model_kind(path: str | Path) -> str:
    path = Path(path)
    if is_gguf(path):
        return "gguf"
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "hf"
    raise ScoreError(
        f"{path}: not a GGUF file, an adapter directory (adapter_config.json) or a model directory (config.json)"
    )


@contextmanager
def open_model(path: str | Path, n_ctx: int = 4096, threads: int | None = None, score_batch: int | None = None):
    """(scorer, tokenizer) for a GGUF (llama.cpp; score_batch tokens per llama.cpp scoring batch) or
    an HF directory (transformers, fp32)."""
    kind = model_kind(path)
    if kind == "gguf":
        from serve.llama import opened
        from serve.tokenizer import GGUFTokenizer

        with opened(path, n_ctx, threads, sequences=SEQUENCES) as llm:
            yield LlamaCppScorer(llm, pack_tokens=score_batch), GGUFTokenizer(llm)
    else:
        needed = ("torch", "peft") if kind == "adapter" else ("torch",)
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            raise ScoreError(
                f"{path}: scoring a transformers model or adapter needs {' and '.join(missing)}, which "
                f"the serve-only install leaves out; install orpo-plugin[train] (or "
                f"{' '.join(missing)}), or score its GGUF export"
            )
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


def score_pairs(scorer, tokenizer, pairs: list, desc: str, progress: bool = True) -> list[dict]:
    """Every pair's scores on one model, in the pairs' order (batched where the scorer batches)."""
    from tqdm import tqdm

    encoded = fitting_pair_ids(scorer, tokenizer, pairs, where=lambda i: f"pair {i + 1}")
    results = [None] * len(pairs)
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=not progress) as bar:
        for pack, scored in score_packs(scorer, encoded):
            for i, result in zip(pack, scored):
                results[i] = result
            bar.update(len(pack))
    return results


def score_models(
    models: list[str],
    pairs: list,
    n_ctx: int = 4096,
    threads: int | None = None,
    progress: bool = True,
    score_batch: int | None = None,
) -> dict:
    report, reference = {"pairs": len(pairs), "models": []}, None
    for model in models:
        kind = model_kind(model)
        with open_model(model, n_ctx, threads, score_batch) as (scorer, tokenizer):
            results = score_pairs(scorer, tokenizer, pairs, f"score {Path(model).name}", progress)
        reference = reference or results
        report["models"].append(
            {"model": str(model), "kind": kind, **summarize(results, reference), "results": results}
        )
    return report


def score_table(report: dict) -> str:
    rows = [
        "| model | pairs | accuracy | mean margin | mean log-odds ratio | agreement with first |",
        "|---|---|---|---|---|---|",
    ]
    for m in report["models"]:
        rows.append(
            f"| {m['model']} | {m['pairs']} | {m['accuracy']:.3f} | {m['mean_margin']:+.4f} | "
            f"{m['mean_log_odds_ratio']:+.4f} | {m['agreement']:.3f} |"
        )
    return "\n".join(rows)
