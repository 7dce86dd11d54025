"""One ORPO training step: orpo_plugin vs Axolotl's built-in `rl: orpo` (TRL's ORPOTrainer).

Same random Llama (LoRA on all linear layers), same pairs, same objective (NLL over prompt and
chosen response, as TRL computes it), sequence 1024 (prompt ~512, answers ~512), 2 pairs a
step, at vocab 32k and 128k. Each measurement runs in a fresh process: step time is the median
of the timed steps after a warm-up step; peak memory is the highest RSS sampled every 2 ms
during the timed steps, minus the RSS just before them (what the step itself adds).

    python benchmarks/bench_train_step.py                 # all, prints a table and JSON
    python benchmarks/bench_train_step.py --vocab 32000   # one vocabulary
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (rl value, plugin overrides, label)
IMPLS = {
    "orpo": ("orpo", {}, "Axolotl rl: orpo (TRL)"),
    "orpo_plugin": ("orpo_plugin", {}, "orpo_plugin (auto = fused)"),
    "orpo_plugin-chunked": ("orpo_plugin", {"orpo_logprob_method": "chunked"}, "orpo_plugin (chunked)"),
    "orpo_plugin-unshared": ("orpo_plugin", {"orpo_prefix_sharing": False}, "orpo_plugin (unshared rows)"),
}


class RssPeak:
    """Samples this process's resident set size in a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval, self.peak, self.running = psutil.Process(), interval, 0, False

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def __enter__(self):
        self.peak, self.running = self.rss(), True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


def _words(rng: random.Random, n: int) -> str:
    vocab = "the of to and in is it you that was for on are with as his they at one have this".split()
    return " ".join(rng.choice(vocab) + str(rng.randint(0, 9)) for _ in range(n))


def pairs(tokenizer, n_pairs: int, prompt_tokens: int, answer_tokens: int, seed: int = 0):
    """String pairs close to the requested token counts on the given tokenizer."""
    from datasets import Dataset

    rng = random.Random(seed)

    def text(target):
        s = _words(rng, target)
        ids = tokenizer(s, add_special_tokens=False)["input_ids"][:target]
        return tokenizer.decode(ids)

    return Dataset.from_list(
        [
            {
                "prompt": text(prompt_tokens),
                "chosen": " " + text(answer_tokens - 1),
                "rejected": " " + text(answer_tokens - 1),
            }
            for _ in range(n_pairs)
        ]
    )


def tokens_per_step(trainer, n_pairs: int) -> tuple[int, int]:
    """(positions the model computes in one batch, padding included; the minimum: each pair's
    prompt once plus both answers)."""
    features = [trainer.train_dataset[i] for i in range(n_pairs)]
    batch = trainer.data_collator(features)
    if "input_ids" in batch:  # ours, either layout
        computed = batch["input_ids"].numel()
        useful = sum(
            len(f["prompt_input_ids"]) + len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features
        )
    else:  # TRL: chosen and rejected rows, both padded to the longer
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        computed = 2 * n_pairs * width
        useful = sum(
            len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) - len(f["prompt_input_ids"]) for f in features
        )
    return computed, useful


def worker(
    impl: str,
    vocab: int,
    hidden: int,
    steps: int,
    seq: int,
    pairs_per_step: int,
    prompt_tokens: int | None = None,
    answer_tokens: int | None = None,
    layers: int = 2,
) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    import torch
    from helpers import build_trainer, load_model, make_cfg
    from transformers import TrainerCallback

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="orpo-bench-"))
    tokenizer = tiny.build_tokenizer(work / "model")
    tiny.build_model(
        "llama",
        work / "model",
        tokenizer=tokenizer,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=hidden // 64,
        num_key_value_heads=2,
        num_hidden_layers=layers,
    )
    rl, overrides, _ = IMPLS[impl]
    cfg = make_cfg(
        work / "model",
        work / "out",
        rl=rl,
        sequence_len=seq,
        micro_batch_size=pairs_per_step,
        max_steps=steps + 1,
        train_on_inputs=True,
        logging_steps=1000,
        **overrides,
    )
    model = load_model(work / "model", lora=True)
    data = pairs(tokenizer, pairs_per_step * (steps + 1), prompt_tokens or seq // 2, answer_tokens or seq // 2 - 4)
    trainer = build_trainer(cfg, model, tokenizer, data)
    computed, useful = tokens_per_step(trainer, pairs_per_step)

    times, peaks = [], []

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.base = time.perf_counter(), sampler.rss()
            sampler.peak = self.base

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:  # the first step warms up allocator and caches
                times.append(time.perf_counter() - self.t0)
                peaks.append(sampler.peak - self.base)

    trainer.add_callback(Measure())
    with RssPeak() as sampler:
        trainer.train()
    return {
        "impl": impl,
        "vocab": vocab,
        "hidden": hidden,
        "seq": seq,
        "pairs_per_step": pairs_per_step,
        "step_s": statistics.median(times),
        "step_peak_mib": max(peaks) / 2**20,
        "tokens_computed": computed,
        "tokens_useful": useful,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def run_one(impl, vocab, args, prompt_tokens=None, answer_tokens=None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--vocab",
        str(vocab),
        "--hidden",
        str(args.hidden),
        "--steps",
        str(args.steps),
        "--seq",
        str(args.seq),
        "--pairs",
        str(args.pairs),
        "--layers",
        str(args.layers),
    ]
    if prompt_tokens:
        cmd += ["--prompt-tokens", str(prompt_tokens), "--answer-tokens", str(answer_tokens)]
    from orpo_demo.env import offline_env

    out = subprocess.run(cmd, env=offline_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({impl}, vocab {vocab}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, action="append")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--answer-tokens", type=int)
    parser.add_argument("--worker", choices=list(IMPLS), help="internal: one measurement, JSON out")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    vocabs = args.vocab or [32000, 128256]
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker,
                    vocabs[0],
                    args.hidden,
                    args.steps,
                    args.seq,
                    args.pairs,
                    args.prompt_tokens,
                    args.answer_tokens,
                    args.layers,
                )
            )
        )
        return
    rows = []
    print("| vocab | trainer | step s | step peak MiB | time vs rl: orpo | memory vs rl: orpo |")
    print("|---|---|---|---|---|---|")
    for vocab in vocabs:
        ref = None
        for impl in ("orpo", "orpo_plugin", "orpo_plugin-chunked"):
            row = run_one(impl, vocab, args)
            rows.append(row)
            ref = ref or row
            print(
                f"| {vocab} | {IMPLS[impl][2]} | {row['step_s']:.2f} | {row['step_peak_mib']:.0f} | "
                f"{row['step_s'] / ref['step_s']:.2f} | {row['step_peak_mib'] / ref['step_peak_mib']:.3f} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
