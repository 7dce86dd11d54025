"""Chosen-vs-rejected scoring, the quantities the trainer logged, for a GGUF or an HF model.

A pair is tokenized exactly as the plugin tokenized it for training (orpo_plugin.pairs: the
prompt rendered with the chat template and the generation prompt, each answer tokenized on its
own and closed by EOS), and compared with orpo_plugin.odds, the same math as the training
metrics. With llama.cpp the shared prompt is evaluated once per pair: its KV cache is kept and
each answer is decoded on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orpo_plugin import odds
from orpo_plugin.pairs import encode_prompts, encode_responses


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


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
    """The part of an HF tokenizer that orpo_plugin.pairs uses, backed by llama.cpp's tokenizer
    and the GGUF's embedded chat template (rendered by transformers, as in training)."""

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        bos = llm.token_bos()
        self.bos_token_id = bos if bos >= 0 else None
        self.eos_token = self._text(self.eos_token_id)
        self.bos_token = self._text(self.bos_token_id) if self.bos_token_id is not None else None
        self.chat_template = llm.metadata.get("tokenizer.chat_template")

    def _text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def __call__(self, texts, add_special_tokens: bool = True):
        one = isinstance(texts, str)
        # llama.cpp adds BOS only where the GGUF says the model wants it (tokenizer.ggml.add_bos_token).
        ids = [self.llm.tokenize(t.encode(), add_bos=add_special_tokens, special=True)
               for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def apply_chat_template(self, messages, chat_template=None, tokenize=False, add_generation_prompt=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        template = chat_template or self.chat_template
        if not template:
            raise ScoreError("the GGUF has no embedded chat template; send \"template\": false with raw text")
        rendered, _ = render_jinja_template([messages], chat_template=template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=self.bos_token or "", eos_token=self.eos_token)
        return rendered[0]


def encode_pair(tokenizer, pair: PairText) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as training made them."""
    from jinja2 import TemplateError

    prompt = pair.prompt
    if pair.template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not tokenizer.chat_template:
            raise ScoreError("the model has no chat template; send \"template\": false to score raw text")
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:
            raise ScoreError(f"prompt: the chat template cannot render these messages ({err})") from None
    [prompt_ids] = encode_prompts(tokenizer, [prompt])
    chosen_ids, rejected_ids = encode_responses(tokenizer, [pair.chosen, pair.rejected])
    return prompt_ids, chosen_ids, rejected_ids


# -- log-probs of answer tokens ---------------------------------------------------------------
def _logprobs_at(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """log softmax(logits[i])[targets[i]] per row, accumulated in float64."""
    logits = logits.astype(np.float64, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    return logits[np.arange(len(targets)), targets] - norm


class LlamaCppScorer:
    """Scores on a loaded llama_cpp.Llama without its n_ctx x vocab logits buffer: the decode
    returns logits for the answer rows only, consumed batch by batch."""

    def __init__(self, llm):
        self.llm = llm
        self.n_ctx = llm.n_ctx()

    def _decode(self, tokens: list[int], n_past: int, every_row: bool) -> np.ndarray:
        """Decode tokens after n_past cached ones; logits of every row, or of the last only."""
        llm, rows = self.llm, []
        for start in range(0, len(tokens), llm.n_batch):
            batch = tokens[start:start + llm.n_batch]
            llm._batch.set_batch(batch=batch, n_past=n_past + start, logits_all=every_row)
            llm._ctx.decode(llm._batch)
            n_out = len(batch) if every_row else 1
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out * llm.n_vocab(),))
            rows.append(logits.reshape(n_out, -1).copy())
        llm.input_ids[n_past:n_past + len(tokens)] = tokens
        llm.n_tokens = n_past + len(tokens)  # the server's prefix reuse for chat sees the true cache
        return np.concatenate(rows if every_row else rows[-1:])

    def answer_logprobs(self, prompt: list[int], answers: list[list[int]], reuse_prompt: bool = True):
        """Per-token log-probs of each answer after the prompt. reuse_prompt=False evaluates
        every full sequence from scratch (the reference the KV reuse is tested against)."""
        llm, out = self.llm, []
        llm._ctx.kv_cache_clear()
        last = self._decode(prompt, 0, every_row=False) if reuse_prompt else None
        for answer in answers:
            if reuse_prompt:
                llm._ctx.kv_cache_seq_rm(-1, len(prompt), -1)
                rows = np.concatenate([last, self._decode(answer[:-1], len(prompt), True)]) \
                    if len(answer) > 1 else last
            else:
                llm._ctx.kv_cache_clear()
                rows = self._decode(prompt + answer[:-1], 0, True)[len(prompt) - 1:]
            out.append(_logprobs_at(rows, answer))
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
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        out = []
        for i, answer in enumerate(answers):
            rows = logits[i, len(prompt) - 1:len(prompt) + len(answer) - 1]
            out.append(torch.log_softmax(rows.double(), -1)[torch.arange(len(answer)), torch.tensor(answer)].numpy())
        return out


# -- one pair, many pairs ---------------------------------------------------------------------
def _answer(logprobs: np.ndarray) -> dict:
    return {"logprob": float(logprobs.sum()), "avg_logprob": float(logprobs.mean()), "n_tokens": int(len(logprobs))}


def score_ids(scorer, prompt: list[int], chosen: list[int], rejected: list[int], reuse_prompt: bool = True) -> dict:
    import torch

    need = len(prompt) + max(len(chosen), len(rejected))
    if need > scorer.n_ctx:
        raise ScoreError(f"the pair needs {need} tokens (prompt {len(prompt)}, longest answer "
                         f"{max(len(chosen), len(rejected))}) but the context holds {scorer.n_ctx}; "
                         f"shorten it or restart with a larger --n-ctx")
    lp_chosen, lp_rejected = scorer.answer_logprobs(prompt, [chosen, rejected], reuse_prompt=reuse_prompt)
    c, r = _answer(lp_chosen), _answer(lp_rejected)
    z = float(odds.log_odds_ratio(torch.tensor(c["avg_logprob"]), torch.tensor(r["avg_logprob"])))
    return {"chosen": c, "rejected": r, "log_odds_ratio": z, "preferred": odds.preferred(z)}


def score_pair(scorer, tokenizer, pair: PairText, reuse_prompt: bool = True) -> dict:
    return score_ids(scorer, *encode_pair(tokenizer, pair), reuse_prompt=reuse_prompt)


def summarize(results: list[dict], reference: list[dict] | None = None) -> dict:
    """Preference accuracy (chosen's average log-prob above rejected's: the trainer's
    rewards/accuracies), mean margin of average log-probs, mean log-odds ratio (log_odds_chosen),
    and, against a reference run on the same pairs, how often both prefer the same answer."""
    n = len(results)
    margins = [r["chosen"]["avg_logprob"] - r["rejected"]["avg_logprob"] for r in results]
    summary = {
        "pairs": n,
        "accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "mean_margin": float(np.mean(margins)) if n else float("nan"),
        "mean_log_odds_ratio": float(np.mean([r["log_odds_ratio"] for r in results])) if n else float("nan"),
    }
    if reference is not None:
        summary["agreement"] = sum(a["preferred"] == b["preferred"] for a, b in zip(results, reference)) / n
    return summary
