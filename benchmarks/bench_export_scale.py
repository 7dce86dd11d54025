"""Export at a real model's size: Llama-3.2-3B's shape (3.2B parameters, random bf16 weights in two
safetensors shards, the real Llama-3.1 tokenizer) with an r=16 LoRA on every linear layer, to f16 and
q4_k_m, two ways, one after the other in this run:

- the path users take today: PEFT `merge_and_unload()` on the bf16 model + `save_pretrained`, then
  llama.cpp's own `convert_hf_to_gguf.py --outtype f16` (from llama-cpp-python's source archive), then
  llama.cpp's quantizer (the same one `orpo` calls) to q4_k_m;
- `orpo merge-and-quantize --quant f16 --quant q4_k_m` (streaming merge, per-tensor checks included).

Each stage runs as a child process whose resident set is sampled from here every 5 ms; the disk in
use under the stage's output directories is sampled too. "Temporary disk" is the most the
directories held beyond the files that remain at the end.

    python benchmarks/bench_export_scale.py [--shape 3b|8b] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # llama.cpp's converter and the real tokenizers, as the tests fetch them
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# fmt: off
SHAPES = {
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               rope_scaling=dict(LLAMA3_ROPE, factor=8.0)),
}
# fmt: on
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARD_BYTES = 5 << 30  # transformers' default shard size


def build_base(shape: str, out: Path) -> dict:
    """config.json, the tokenizer's files and random bf16 shards with an index, written tensor by tensor."""
    import real_tokenizers
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128009,
        **SHAPES[shape],
    )
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = "bfloat16"
    config.save_pretrained(str(out))
    real_tokenizers.install("llama3", out)
    c, kv = config, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (c.num_attention_heads * c.head_dim, c.hidden_size),
                p + "self_attn.k_proj.weight": (kv, c.hidden_size),
                p + "self_attn.v_proj.weight": (kv, c.hidden_size),
                p + "self_attn.o_proj.weight": (c.hidden_size, c.num_attention_heads * c.head_dim),
                p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
                p + "input_layernorm.weight": (c.hidden_size,),
                p + "post_attention_layernorm.weight": (c.hidden_size,),
            }
        )
    generator = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, dims in shapes.items():
        tensor = torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=generator) * 0.02
        current[name] = tensor.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() for shard in shards for t in shard.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    )
    return {
        "parameters": total,
        "largest_tensor_bytes": max(t.numel() * 2 for s in shards for t in s.values()),
        "shards": len(shards),
    }


def build_adapter(base: Path, out: Path, r: int = 16) -> None:
    """A PEFT adapter file (r=16, alpha 32, every linear layer) with random A and B, written directly."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from serve.export.checkpoint import Checkpoint

    checkpoint = Checkpoint(base)
    shapes = {name: checkpoint.shape(name) for name in checkpoint.names() if name.split(".")[-2] in TARGETS}
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (rows, cols) in shapes.items():
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, cols, generator=generator) / cols**0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(rows, r, generator=generator) * 1e-3
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM", base_model_name_or_path=str(base)
    ).save_pretrained(str(out))
    assert checkpoint.config["num_hidden_layers"] * len(TARGETS) == len(shapes)


# -- stages, each in a child process --------------------------------------------------------------
def stage(kind: str, *args: str) -> None:
    if kind == "peft-merge":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base, adapter, out = args
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    elif kind == "quantize":
        from serve.export.quantize import quantize

        quantize(args[0], args[1], "q4_k_m", threads=os.cpu_count())


def measure(command: list[str], watch: list[Path], env: dict | None = None) -> dict:
    """Run a command; sample its process tree's resident set and the disk used under `watch`."""
    import psutil

    def used() -> int:
        return sum(f.stat().st_blocks * 512 for d in watch if d.exists() for f in d.rglob("*") if f.is_file())

    start_disk, start = used(), time.perf_counter()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read after the stage). Not a pipe: progress bars would fill it and stall the stage
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    root, peak_rss, peak_disk, last_disk = psutil.Process(proc.pid), 0, start_disk, 0.0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            peak_rss = max(peak_rss, rss)
        except psutil.Error:
            pass
        if time.perf_counter() - last_disk > 0.5:
            peak_disk, last_disk = max(peak_disk, used()), time.perf_counter()
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    log.seek(0)
    err = log.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command[:4])} failed:\n{err[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss": peak_rss,
        "peak_disk": peak_disk - start_disk,
        "end_disk": used() - start_disk,
        "stderr": err,
    }


def run(shape: str, tmp: Path) -> None:
    import official

    from orpo_demo.env import BIN, offline_env

    env = offline_env()
    info = build_base(shape, tmp / "base")
    build_adapter(tmp / "base", tmp / "adapter")
    largest = info["largest_tensor_bytes"]
    print("model: Llama-3.2-3B shape" if shape == "3b" else "model: Llama-3.1-8B shape", end="")
    print(
        f", {info['parameters'] / 1e9:.2f}B parameters, bf16 in {info['shards']} shards "
        f"({sum(f.stat().st_size for f in (tmp / 'base').glob('*.safetensors')) / 2**30:.1f} GiB), largest tensor "
        f"{largest / 2**20:.0f} MiB; LoRA r=16 on {', '.join(TARGETS)}; {os.cpu_count()} threads"
    )

    peer_dir = tmp / "peer"
    peer_dir.mkdir()
    converter = official.converter_dir()
    me = [sys.executable, __file__, "--stage"]
    peer = [
        (
            "PEFT merge_and_unload + save_pretrained (bf16)",
            measure(
                [*me, "peft-merge", str(tmp / "base"), str(tmp / "adapter"), str(peer_dir / "merged")], [peer_dir], env
            ),
        ),
        (
            "convert_hf_to_gguf.py --outtype f16",
            measure(
                [
                    sys.executable,
                    str(converter / "convert_hf_to_gguf.py"),
                    str(peer_dir / "merged"),
                    "--outfile",
                    str(peer_dir / "model-f16.gguf"),
                    "--outtype",
                    "f16",
                ],
                [peer_dir],
                dict(env, PYTHONPATH=str(converter / "gguf-py")),
            ),
        ),
        (
            "llama.cpp quantize f16 -> q4_k_m",
            measure(
                [*me, "quantize", str(peer_dir / "model-f16.gguf"), str(peer_dir / "model-q4_k_m.gguf")],
                [peer_dir],
                env,
            ),
        ),
    ]
    peer_temp = sum(f.stat().st_blocks * 512 for f in (peer_dir / "merged").rglob("*") if f.is_file())
    peer_outputs = {q: (peer_dir / f"model-{q}.gguf").stat().st_size for q in ("f16", "q4_k_m")}
    shutil.rmtree(peer_dir)  # room for ours

    out = tmp / "ours"
    ours = measure(
        [
            str(BIN / "orpo"),
            "merge-and-quantize",
            "--base",
            str(tmp / "base"),
            "--adapter",
            str(tmp / "adapter"),
            "--out",
            str(out),
            "--quant",
            "f16",
            "--quant",
            "q4_k_m",
            "--threads",
            str(os.cpu_count()),
        ],
        [out],
        env,
    )
    report = json.loads((out / "export_report.json").read_text())
    outputs = {q: f["bytes"] for q, f in report["files"].items()}
    ours_temp = max(0, ours["peak_disk"] - ours["end_disk"])

    print("\n| path | stage | seconds | peak RSS GiB |")
    print("|---|---|---|---|")
    for name, m in peer:
        print(f"| peer | {name} | {m['seconds']:.0f} | {m['peak_rss'] / 2**30:.2f} |")
    for s in report["stages"]:
        print(f"| orpo | {s['stage']} | {s['seconds']:.0f} | {s['peak_rss_mib'] / 1024:.2f} |")
    peer_seconds = sum(m["seconds"] for _, m in peer)
    peer_rss = max(m["peak_rss"] for _, m in peer)
    print("\n| path | wall s | peak RSS GiB | temporary disk GiB | f16 GiB | q4_k_m GiB |")
    print("|---|---|---|---|---|---|")
    print(
        f"| peer (PEFT + convert_hf_to_gguf.py + quantize) | {peer_seconds:.0f} | {peer_rss / 2**30:.2f} | "
        f"{peer_temp / 2**30:.2f} | {peer_outputs['f16'] / 2**30:.2f} | {peer_outputs['q4_k_m'] / 2**30:.2f} |"
    )
    print(
        f"| orpo merge-and-quantize (checks included) | {ours['seconds']:.0f} | {ours['peak_rss'] / 2**30:.2f} | "
        f"{ours_temp / 2**30:.2f} | {outputs['f16'] / 2**30:.2f} | {outputs['q4_k_m'] / 2**30:.2f} |"
    )
    print(
        f"\norpo / peer: wall time {ours['seconds'] / peer_seconds:.2f}x, peak RSS {ours['peak_rss'] / peer_rss:.2f}x; "
        f"orpo's peak RSS is {ours['peak_rss'] / largest:.2f}x the largest tensor ({largest / 2**30:.2f} GiB in bf16; "
        f"target 2x + 1 GiB = {(2 * largest + 2**30) / 2**30:.2f} GiB); temporary disk {ours_temp / 2**30:.2f} GiB "
        f"against the largest output's {max(outputs.values()) / 2**30:.2f} GiB"
    )
    t = report["tensors"]
    print(
        f"checks: {t['f16']['checked']} tensors per file; worst relative RMS error f16 {t['f16']['worst_rel_rms']:.1e} "
        f"(vs merged weights), q4_k_m {t['q4_k_m']['worst_rel_rms']:.1e} (vs the f16 file); tokens identical: "
        f"{all(m['tokens_identical'] for m in report['models'].values())}; logits: {report['logits']}; "
        f"failed checks: {report['failed_checks']}"
    )


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--stage":
        stage(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="3b")
    parser.add_argument(
        "--keep", type=Path, default=None, help="work here and keep the files (default: a temporary directory, removed)"
    )
    args = parser.parse_args()
    if args.keep:
        run(args.shape, args.keep)
        return
    with tempfile.TemporaryDirectory(prefix="orpo-bench-export-scale-") as tmp:
        run(args.shape, Path(tmp))


if __name__ == "__main__":
    main()
