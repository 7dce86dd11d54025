"""Chosen-vs-rejected scoring, the quantities the trainer logged, for a GGUF or an HF model.

A pair is tokenized by the core exactly as training tokenized it (orpo_plugin.core.tokenize: the
prompt rendered with the chat template and the generation prompt, each answer tokenized on its
own and closed by EOS), its answer tokens' log-probs come from core.logprobs, and the pair is
compared with core.odds, the code the training metrics run. With llama.cpp the shared prompt is
evaluated once per pair: its KV cache is kept and each answer is decoded on top of it.

Nothing here imports torch unless an HF model is scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orpo_plugin.core import odds
from orpo_plugin.core.chat_template import render as render_template
from orpo_plugin.core.formats import OrpoDataError
from orpo_plugin.core.logprobs import target_logprobs
from orpo_plugin.core.tokenize import tokenize_pair


class ScoreError(ValueError):
    """A request that cannot be scored; the message names the field and the fix."""


@dataclass(frozen=True)
class PairText:
    """prompt: a string (one user turn, or raw text when template is False) or chat messages."""

    prompt: str | list[dict]
    chosen: str
    rejected: str
    template: bool = True


# -- tokenization: the training path, for HF tokenizers and for a GGUF's own ------------------
class GGUFTokenizer:
    """The part of an HF tokenizer that core.tokenize uses, backed by llama.cpp's tokenizer and the
    GGUF's embedded chat template (rendered by core.chat_template, as transformers renders it)."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        # As HF: a BOS only where the tokenizer adds one. A GGUF that says no (Qwen2) still names
        # one, and llama.cpp falls back to token 11 where it names none.
        declared = "tokenizer.ggml.bos_token_id" in llm.metadata
        adds_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        self.bos_token_id = llm.token_bos() if declared and adds_bos else None
        self.eos_token = self._text(self.eos_token_id)
        self.bos_token = self._text(llm.token_bos()) if declared else None  # for templates that write it
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def _text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def __call__(self, texts, add_special_tokens: bool = True):
        one = isinstance(texts, str)
        # llama.cpp adds BOS only where the GGUF says the model wants it (tokenizer.ggml.add_bos_token).
        ids = [self.llm.tokenize(t.encode(), add_bos=add_special_tokens, special=True)
               for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=False,
                            tools=None):
        return render_template(chat_template or self.chat_template, messages, add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token, tools=tools)


def encode_pair(tokenizer, pair: PairText) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as training made them."""
    prompt = pair.prompt
    if pair.template:
        if not tokenizer.chat_template:
            raise ScoreError("the model has no chat template; send \"template\": false to score raw text")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
    try:
        ids, _ = tokenize_pair(tokenizer, prompt, pair.chosen, pair.rejected)
    except OrpoDataError as err:
        raise ScoreError(f"prompt: {err}") from None
    return ids["prompt_input_ids"], ids["chosen_input_ids"], ids["rejected_input_ids"]


# -- log-probs of answer tokens ---------------------------------------------------------------
class LlamaCppScorer:
    """Scores on a loaded llama_cpp.Llama without its n_ctx x vocab logits buffer: the decode
    returns logits for the answer rows only, consumed batch by batch."""

    def __init__(self, llm):
        from serve.llama import KVCache

        self.cache = KVCache(llm)
        self.n_ctx = self.cache.n_ctx

    def answer_logprobs(self, prompt: list[int], answers: list[list[int]], reuse_prompt: bool = True):
        """Per-token log-probs of each answer after the prompt. reuse_prompt=False evaluates
        every full sequence from scratch (the reference the KV reuse is tested against)."""
        cache, out = self.cache, []
        cache.clear()
        last = cache.decode(prompt, every_row=False) if reuse_prompt else None
        for answer in answers:
            if reuse_prompt:
                cache.truncate(len(prompt))
                rows = np.concatenate([last, cache.decode(answer[:-1], every_row=True)]) if len(answer) > 1 else last
            else:
                cache.clear()
                rows = cache.decode(prompt + answer[:-1], every_row=True)[len(prompt) - 1:]
            out.append(target_logprobs(rows.astype(np.float64), np.asarray(answer)))
        return out


class HFScorer:
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
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        return [target_logprobs(logits[i, len(prompt) - 1:len(prompt) + len(a) - 1].double(), torch.tensor(a)).numpy()
                for i, a in enumerate(answers)]


# -- one pair, many pairs ---------------------------------------------------------------------
def _answer(logprobs: np.ndarray) -> dict:
    return {"logprob": float(logprobs.sum()), "avg_logprob": float(logprobs.mean()), "n_tokens": int(len(logprobs))}


def score_ids(scorer, prompt: list[int], chosen: list[int], rejected: list[int], reuse_prompt: bool = True) -> dict:
    need = len(prompt) + max(len(chosen), len(rejected))
    if need > scorer.n_ctx:
        raise ScoreError(f"the pair needs {need} tokens (prompt {len(prompt)}, longest answer "
                         f"{max(len(chosen), len(rejected))}) but the context holds {scorer.n_ctx}; "
                         f"shorten it or restart with a larger --n-ctx")
    lp_chosen, lp_rejected = scorer.answer_logprobs(prompt, [chosen, rejected], reuse_prompt=reuse_prompt)
    c, r = _answer(lp_chosen), _answer(lp_rejected)
    z = float(odds.log_odds_ratio(np.float64(c["avg_logprob"]), np.float64(r["avg_logprob"])))
    return {"chosen": c, "rejected": r, "log_odds_ratio": z, "preferred": odds.preferred(z)}


def score_pair(scorer, tokenizer, pair: PairText, reuse_prompt: bool = True) -> dict:
    return score_ids(scorer, *encode_pair(tokenizer, pair), reuse_prompt=reuse_prompt)


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
