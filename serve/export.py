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
    chats = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in SAMPLE_MESSAGES] \
        if tokenizer.chat_template else []
    return chats + SAMPLE_TEXTS


def parity(model_dir: Path, tokenizer, gguf_paths: dict[str, Path], threads: int) -> dict:
    """Tokenization and next-token log-probs of each GGUF against the merged HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    from serve.llama import KVCache, opened

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    texts = _sample_texts(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    with torch.no_grad():
        reference = [log_softmax(hf(torch.tensor([ids])).logits[0].double()).numpy() for ids in encoded]
    report = {"texts": len(texts), "models": {}}
    for name, path in gguf_paths.items():
        with opened(path, n_ctx=512, threads=threads) as llm:
            cache, same_tokens, max_abs, kls = KVCache(llm), True, 0.0, []
            for text, ids, ref in zip(texts, encoded, reference):
                same_tokens &= llm.tokenize(text.encode(), add_bos=True, special=True) == ids
                cache.clear()
                ours = log_softmax(cache.decode(ids, every_row=True).astype(np.float64))
                max_abs = max(max_abs, float(np.abs(ours - ref).max()))
                kls.append(float((np.exp(ref) * (ref - ours)).sum(-1).mean()))
        report["models"][name] = {"tokens_identical": bool(same_tokens), "max_abs_logprob_diff": max_abs,
                                  "mean_kl": float(np.mean(kls))}
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
    write_json(out_dir / "export_report.json", report)
    return report


def report_table(report: dict) -> str:
    rows = ["| file | MiB | tokens identical | max abs log-prob diff | mean KL |", "|---|---|---|---|---|"]
    for quant, f in report["files"].items():
        m = report["models"][quant]
        rows.append(f"| {f['path']} | {f['bytes'] / 2**20:.1f} | {m['tokens_identical']} | "
                    f"{m['max_abs_logprob_diff']:.4f} | {m['mean_kl']:.2e} |")
    return "\n".join(rows)
