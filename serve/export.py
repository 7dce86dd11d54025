"""adapter -> merged model -> GGUF -> quantized GGUFs + Modelfile + export_report.json.

One intermediate f32 GGUF feeds every llama.cpp quantization; f32/f16/bf16/q8_0 are written
directly from the merged weights. The report checks that each GGUF behaves like the merged HF
model: identical tokenization of sample texts, and next-token log-prob agreement.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from orpo_plugin.core.atomic import write_json
from orpo_plugin.core.logprobs import log_softmax
from serve.convert import OUT_TYPES, convert
from serve.merge import merge_adapter
from serve.modelfile import write_modelfile
from serve.quantize import QUANT_TYPES, quantize

SAMPLE_MESSAGES = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a prime number above 10."}],
]
SAMPLE_TEXTS = ["Plain text: digits 2024, punctuation!? and ünïcödé.", "  leading spaces\nand a newline"]
PREFERRED_FOR_MODELFILE = ("q4_k_m", "q5_k_m", "q8_0", "f16")


class ExportError(ValueError):
    pass


def check_request(out_dir: Path, quants: list[str], force: bool) -> list[str]:
    quants = list(dict.fromkeys(q.lower() for q in quants))
    unknown = [q for q in quants if q not in OUT_TYPES and q not in QUANT_TYPES]
    if unknown or not quants:
        raise ExportError(f"unknown quantization {', '.join(unknown) or '(none)'}; choose from "
                          f"{', '.join(sorted(set(OUT_TYPES) | set(QUANT_TYPES)))}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} already exists and is not empty; pass --force to overwrite it")
    return quants


def _sample_texts(tokenizer) -> list[str]:
    """Chat renderings the model's template accepts (Mistral v0.1's refuses a system turn), and
    plain texts."""
    from jinja2 import TemplateError

    chats = []
    for messages in SAMPLE_MESSAGES if tokenizer.chat_template else []:
        try:
            chats.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        except TemplateError:
            continue
    return chats + SAMPLE_TEXTS


LONG_TOKENS = 1536  # past the original context of a scaled RoPE in the tests, within every model's
WINDOW = 128
# Mean next-token KL a GGUF of this type may show over the long sequence. A GGUF that computes
# something else than the model is orders of magnitude above (Llama 3's RoPE scaling left out:
# 0.05 for f32, growing with position). K-quants are reported, not judged: their error depends on
# the model.
LONG_KL_BOUND = {"f32": 1e-4, "f16": 1e-3, "bf16": 1e-3, "q8_0": 2e-2}


def _long_ids(tokenizer, config_context: int) -> list[int]:
    """A deterministic sequence of ordinary tokens, as long as the model allows up to LONG_TOKENS."""
    special = set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    n = min(LONG_TOKENS, config_context)
    return [ordinary[i] for i in np.random.default_rng(0).integers(0, len(ordinary), n)]


def _long_check(kl: np.ndarray, quant: str) -> dict:
    """Mean KL over the sequence and per WINDOW positions (the worst window and the first)."""
    means = [float(kl[i:i + WINDOW].mean()) for i in range(0, len(kl), WINDOW)]
    worst = int(np.argmax(means))
    bound = LONG_KL_BOUND.get(quant)
    return {"tokens": len(kl), "mean_kl": float(kl.mean()), "bound": bound, "first_window_kl": means[0],
            "worst_window": [worst * WINDOW, min(len(kl), (worst + 1) * WINDOW)], "worst_window_kl": means[worst],
            "ok": bound is None or float(kl.mean()) <= bound}


def parity(model_dir: Path, tokenizer, gguf_paths: dict[str, Path], threads: int) -> dict:
    """Tokenization and next-token log-probs of each GGUF against the merged HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    from serve.llama import KVCache, opened

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    texts = _sample_texts(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    long_ids = _long_ids(tokenizer, hf.config.max_position_embeddings)
    with torch.no_grad():
        reference = [log_softmax(hf(torch.tensor([ids])).logits[0].double()).numpy() for ids in encoded]
        long_reference = log_softmax(hf(torch.tensor([long_ids])).logits[0].double()).numpy()
    del hf
    report = {"texts": len(texts), "models": {}}
    for name, path in gguf_paths.items():
        with opened(path, n_ctx=max(512, len(long_ids)), threads=threads) as llm:
            cache, same_tokens, max_abs, kls = KVCache(llm), True, 0.0, []
            for text, ids, ref in zip(texts, encoded, reference):
                same_tokens &= llm.tokenize(text.encode(), add_bos=True, special=True) == ids
                cache.clear()
                ours = log_softmax(cache.decode(ids, every_row=True).astype(np.float64))
                max_abs = max(max_abs, float(np.abs(ours - ref).max()))
                kls.append(float((np.exp(ref) * (ref - ours)).sum(-1).mean()))
            cache.clear()
            ours = log_softmax(cache.decode(long_ids, every_row=True).astype(np.float64))
        long = _long_check((np.exp(long_reference) * (long_reference - ours)).sum(-1), name)
        report["models"][name] = {"tokens_identical": bool(same_tokens), "max_abs_logprob_diff": max_abs,
                                  "mean_kl": float(np.mean(kls)), "long": long,
                                  "ok": bool(same_tokens) and long["ok"]}
    return report


def export(base: str | Path, adapter: str | Path | None, out_dir: str | Path, quants: list[str],
           force: bool = False, threads: int = 2, num_ctx: int = 4096, progress=print) -> dict:
    out_dir = Path(out_dir)
    quants = check_request(out_dir, quants, force)
    if out_dir.exists() and force:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    times, files = {}, {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work-") as work:
        work = Path(work)
        start = time.perf_counter()
        if adapter:
            progress(f"merge: {adapter} into {base}")
            model_dir = merge_adapter(base, adapter, work / "merged")
        else:
            model_dir = Path(base)
        times["merge_s"] = time.perf_counter() - start
        intermediate = None
        for quant in quants:
            start = time.perf_counter()
            target = out_dir / f"model-{quant}.gguf"
            progress(f"write {target.name}")
            if quant in OUT_TYPES:
                convert(model_dir, target, quant, progress=True)
            else:
                if intermediate is None:
                    intermediate = convert(model_dir, work / "model-f32.gguf", "f32", progress=True)
                quantize(intermediate, target, quant, threads=threads, progress=True)
            files[quant] = target
            times[f"{quant}_s"] = time.perf_counter() - start
        progress("check: tokenization and log-probs against the merged model")
        start = time.perf_counter()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        report = parity(model_dir, tokenizer, files, threads)
        times["parity_s"] = time.perf_counter() - start
        chosen = next((q for q in PREFERRED_FOR_MODELFILE if q in files), quants[0])
        write_modelfile(out_dir, files[chosen].name, tokenizer.chat_template, num_ctx, tokenizer.eos_token or "</s>",
                        tokenizer.bos_token)
    report.update({
        "base": str(base), "adapter": str(adapter) if adapter else None, "times": times,
        "files": {q: {"path": p.name, "bytes": p.stat().st_size} for q, p in files.items()},
        "modelfile": {"from": files[chosen].name},
    })
    report["failed_checks"] = failures(report)
    write_json(out_dir / "export_report.json", report)
    return report


def report_table(report: dict) -> str:
    rows = ["| file | MiB | tokens identical | max abs log-prob diff | mean KL | long sequence: worst window KL |",
            "|---|---|---|---|---|---|"]
    for quant, f in report["files"].items():
        m = report["models"][quant]
        long = m["long"]
        a, b = long["worst_window"]
        rows.append(f"| {f['path']} | {f['bytes'] / 2**20:.1f} | {m['tokens_identical']} | "
                    f"{m['max_abs_logprob_diff']:.4f} | {m['mean_kl']:.2e} | {long['worst_window_kl']:.2e} at "
                    f"{a}-{b} (first {WINDOW}: {long['first_window_kl']:.2e}) |")
    return "\n".join(rows)


def failures(report: dict) -> list[str]:
    """One line per GGUF that does not behave like the merged model."""
    out = []
    for quant, m in report["models"].items():
        if not m["tokens_identical"]:
            out.append(f"{report['files'][quant]['path']}: llama.cpp tokenizes the sample texts differently from "
                       f"the model's tokenizer")
        if not m["long"]["ok"]:
            a, b = m["long"]["worst_window"]
            out.append(f"{report['files'][quant]['path']}: mean next-token KL {m['long']['mean_kl']:.2e} over a "
                       f"{m['long']['tokens']}-token sequence, above {m['long']['bound']:.0e} for {quant} (worst at "
                       f"positions {a}-{b}: {m['long']['worst_window_kl']:.2e}); the GGUF does not compute what the "
                       f"model does there: check its RoPE scaling and attention settings")
    return out
