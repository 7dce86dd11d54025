"""GGUF export on a ~130M-parameter random Llama: peak memory of the conversion against the
model's size on disk, and where the time goes (convert vs llama.cpp quantization).

Each stage runs in a fresh process. Peak memory is sampled every 2 ms (RSS, which counts the
safetensors pages read through mmap); "above baseline" subtracts the RSS after torch,
transformers and the project are imported.

    python benchmarks/bench_export.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import RssPeak  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000)


def stage(kind: str, src: str, dst: str) -> dict:
    import torch  # noqa: F401  (imported before the baseline: libraries are not the conversion)
    import transformers  # noqa: F401

    from serve.convert import convert
    from serve.quantize import quantize

    with RssPeak() as sampler:
        baseline = sampler.rss()
        start = time.perf_counter()
        if kind == "quantize":
            quantize(src, dst, "q4_k_m", threads=os.cpu_count())
        else:
            convert(src, dst, kind)
        seconds = time.perf_counter() - start
    return {"stage": kind, "seconds": seconds, "peak_rss_mib": sampler.peak / 2**20,
            "above_baseline_mib": (sampler.peak - baseline) / 2**20}


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--stage":
        print(json.dumps(stage(*sys.argv[2:])))
        return
    from orpo_plugin import tiny

    with tempfile.TemporaryDirectory(prefix="orpo-bench-export-") as tmp:
        tmp = Path(tmp)
        model = tiny.build_model("llama", tmp / "model", **SHAPE)
        params = sum(p.numel() for p in model.parameters())
        del model
        on_disk = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors")) / 2**20
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        rows = []
        for kind, src, dst in (("f32", tmp / "model", tmp / "m-f32.gguf"), ("f16", tmp / "model", tmp / "m-f16.gguf"),
                               ("q8_0", tmp / "model", tmp / "m-q8_0.gguf"),
                               ("quantize", tmp / "m-f32.gguf", tmp / "m-q4_k_m.gguf")):
            out = subprocess.run([sys.executable, __file__, "--stage", kind, str(src), str(dst)], env=env,
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"model: {params / 1e6:.0f}M parameters, {on_disk:.0f} MiB of f32 safetensors")
        print("| stage | seconds | peak RSS MiB | above baseline MiB | above baseline / model on disk |")
        print("|---|---|---|---|---|")
        for r in rows:
            label = "q4_k_m (llama.cpp, from the f32 GGUF)" if r["stage"] == "quantize" else f"convert to {r['stage']}"
            print(f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['above_baseline_mib']:.0f} | "
                  f"{r['above_baseline_mib'] / on_disk:.2f} |")


if __name__ == "__main__":
    main()
