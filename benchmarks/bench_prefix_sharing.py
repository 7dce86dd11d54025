"""Prefix sharing + packing vs unshared rows vs Axolotl's `rl: orpo`, by prompt:answer ratio.

Same random Llama (hidden 512, 4 layers, vocab 32k, LoRA), 4 pairs a step, same objective
(train_on_inputs: true), answers of 128 tokens and prompts of 128, 256 and 512 tokens
(1:1, 2:1, 4:1). Reports step time, step peak memory (as bench_train_step.py measures them),
useful tokens per second (each pair's prompt once plus both answers) and how close the
computed positions are to that minimum.

    python benchmarks/bench_prefix_sharing.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import IMPLS, run_one

RATIOS = {"1:1": (128, 128), "2:1": (256, 128), "4:1": (512, 128)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", action="append", choices=list(RATIOS))
    args = parser.parse_args(argv)
    shape = argparse.Namespace(hidden=512, layers=4, steps=2, seq=1024, pairs=4)
    print(
        "| prompt:answer | trainer | step s | step peak MiB | useful tokens/s | computed / minimum tokens | "
        "time vs rl: orpo | memory vs rl: orpo |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ratio in args.ratio or list(RATIOS):
        prompt, answer = RATIOS[ratio]
        ref = None
        for impl in ("orpo", "orpo_plugin-unshared", "orpo_plugin"):
            row = run_one(impl, 32000, shape, prompt_tokens=prompt, answer_tokens=answer)
            ref = ref or row
            label = IMPLS[impl][2] if impl != "orpo_plugin" else "orpo_plugin (prefix sharing + packing)"
            print(
                f"| {ratio} | {label} | {row['step_s']:.2f} | {row['step_peak_mib']:.0f} | "
                f"{row['tokens_useful'] / row['step_s']:.0f} | {row['tokens_computed'] / row['tokens_useful']:.2f} | "
                f"{row['step_s'] / ref['step_s']:.2f} | {row['step_peak_mib'] / ref['step_peak_mib']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
