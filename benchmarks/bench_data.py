"""Preference-data preparation: pairs/second from a JSONL file to the token ids a trainer steps on.

Same 100k synthetic pairs (Argilla-style conversations, which both paths read), same fixture
tokenizer and chat template, dataset_num_proc 2, fresh process and fresh datasets cache each:
- orpo_plugin: `type: orpo_plugin.preference`, our pipeline (read, check every row, render,
  tokenize, fit), then building OrpoTrainer (nothing left to tokenize there).
- Axolotl `rl: orpo`: `type: chat_template.argilla` through Axolotl's RL loader (transform and
  length filter), then building TRL's ORPOTrainer, which tokenizes every row in its __init__.

    python benchmarks/bench_data.py [--pairs 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the a of to and in is it you that was for on are with as his they at one have this".split()
    with path.open("w") as f:
        for _ in range(n):
            question = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) + "?"
            good = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            bad = " ".join(rng.choice(words) for _ in range(rng.randint(5, 60)))
            user = {"role": "user", "content": question}
            f.write(
                json.dumps(
                    {
                        "chosen": [user, {"role": "assistant", "content": good}],
                        "rejected": [user, {"role": "assistant", "content": bad + " no"}],
                    }
                )
                + "\n"
            )


def worker(impl: str, data: Path, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny
    from helpers import build_trainer, load_model, make_cfg

    tokenizer = tiny.build_tokenizer(work / "model")
    tiny.build_model("llama", work / "model", tokenizer=tokenizer)
    ds_type = "orpo_plugin.preference" if impl == "orpo_plugin" else "chat_template.argilla"
    cfg = make_cfg(
        work / "model",
        work / "out",
        rl=impl,
        sequence_len=512,
        dataset_num_proc=2,
        datasets=[{"path": str(data), "ds_type": "json", "type": ds_type}],
    )
    model = load_model(work / "model", lora=True)
    start = time.perf_counter()
    if impl == "orpo_plugin":
        from orpo_plugin.datasets import prepare_split

        train = prepare_split(cfg, tokenizer, "datasets")
    else:
        from axolotl.utils.data.rl import _load_split

        cfg.is_preprocess = True  # no datasets cache between runs
        train = _load_split(cfg, "train")
    prepared = time.perf_counter()
    trainer = build_trainer(cfg, model, tokenizer, train)
    done = time.perf_counter()
    return {
        "impl": impl,
        "pairs_in": sum(1 for _ in data.open()),
        "pairs_out": len(trainer.train_dataset),
        "prepare_s": prepared - start,
        "trainer_tokenize_s": done - prepared,
        "total_s": done - start,
    }


def run(impl: str, data: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="orpo-bench-data-") as work:
        from orpo_demo.env import offline_env

        env = dict(offline_env(), HF_DATASETS_CACHE=f"{work}/cache")
        out = subprocess.run(
            [sys.executable, __file__, "--worker", impl, "--data", str(data), "--work", work],
            env=env,
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        raise SystemExit(f"benchmark worker failed ({impl}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--worker", choices=["orpo", "orpo_plugin"], help="internal: one measurement")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.work)))
        return
    with tempfile.TemporaryDirectory(prefix="orpo-bench-pairs-") as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_pairs(data, args.pairs)
        rows = [run("orpo", data), run("orpo_plugin", data)]
    ref = rows[0]
    print("| path | pairs in | pairs out | prepare s | trainer tokenize s | total s | pairs/s | speed vs rl: orpo |")
    print("|---|---|---|---|---|---|---|---|")
    for row, label in zip(rows, ["Axolotl rl: orpo (chat_template.argilla + TRL)", "orpo_plugin.preference"]):
        rate = row["pairs_in"] / row["total_s"]
        print(
            f"| {label} | {row['pairs_in']} | {row['pairs_out']} | {row['prepare_s']:.1f} | "
            f"{row['trainer_tokenize_s']:.1f} | {row['total_s']:.1f} | {rate:.0f} | "
            f"{ref['total_s'] / row['total_s']:.2f}x |"
        )


if __name__ == "__main__":
    main()
