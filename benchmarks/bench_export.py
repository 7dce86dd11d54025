"""GGUF export on a ~130M-parameter random Llama: peak memory of the conversion against the
model's size on disk, and where the time goes (convert vs llama.cpp quantization, from the f16
file as the export does).

Each stage runs in a fresh process, whose resident set this process samples every 2 ms from the
outside (a sampling thread inside would compete with the stage for the GIL and slow it down);
"above baseline" subtracts the resident set after torch, transformers' AutoTokenizer and the
project are imported, when the stage says it starts.

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test fixtures (tiny models)
# fmt: off
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000)
# fmt: on


def stage(kind: str, src: str, dst: str) -> dict:
    # Imported before the baseline: libraries are not the conversion. serve.export.convert imports no
    # transformers itself; the tokenizer it loads does, so that comes first too.
    import psutil
    import torch  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401

    from serve.export.convert import convert
    from serve.export.quantize import quantize

    print("start", psutil.Process().memory_info().rss, flush=True)
    start = time.perf_counter()
    if kind == "quantize":
        quantize(src, dst, "q4_k_m", threads=os.cpu_count())
    else:
        convert(src, dst, kind)
    return {"stage": kind, "seconds": time.perf_counter() - start}


def measure(args: list[str], env: dict) -> dict:
    """Run one stage; sample its RSS (with its children's: the quantizer runs in one) from here
    between its "start" line and its exit."""
    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--stage", *args], env=env, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(proc.pid)
    while not (line := proc.stdout.readline()).startswith("start"):
        pass
    baseline = peak = int(line.split()[1])
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [child, *child.children(recursive=True)]))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.002)
    result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    if proc.wait():
        raise SystemExit(f"stage {args} failed")
    return dict(result, peak_rss_mib=peak / 2**20, above_baseline_mib=(peak - baseline) / 2**20)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--stage":
        print(json.dumps(stage(*sys.argv[2:])))
        return
    import tiny

    with tempfile.TemporaryDirectory(prefix="orpo-bench-export-") as tmp:
        tmp = Path(tmp)
        model = tiny.build_model("llama", tmp / "model", **SHAPE)
        params = sum(p.numel() for p in model.parameters())
        del model
        on_disk = sum(f.stat().st_size for f in (tmp / "model").glob("*.safetensors")) / 2**20
        from orpo_demo.env import offline_env

        env = offline_env()
        rows = []
        for kind, src, dst in (
            ("f32", tmp / "model", tmp / "m-f32.gguf"),
            ("f16", tmp / "model", tmp / "m-f16.gguf"),
            ("q8_0", tmp / "model", tmp / "m-q8_0.gguf"),
            ("quantize", tmp / "m-f16.gguf", tmp / "m-q4_k_m.gguf"),
        ):
            rows.append(measure([kind, str(src), str(dst)], env))
        print(f"model: {params / 1e6:.0f}M parameters, {on_disk:.0f} MiB of f32 safetensors")
        print("| stage | seconds | peak RSS MiB | above baseline MiB | above baseline / model on disk |")
        print("|---|---|---|---|---|")
        for r in rows:
            label = "q4_k_m (llama.cpp, from the f16 GGUF)" if r["stage"] == "quantize" else f"convert to {r['stage']}"
            print(
                f"| {label} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['above_baseline_mib']:.0f} | "
                f"{r['above_baseline_mib'] / on_disk:.2f} |"
            )
        by_stage = {r["stage"]: r["seconds"] for r in rows}
        print(
            f"export to q4_k_m (convert f16 + quantize): quantization is "
            f"{by_stage['quantize'] / (by_stage['f16'] + by_stage['quantize']):.0%} of the time"
        )


if __name__ == "__main__":
    main()
