"""merge-and-quantize's preference check: held-out pairs through the merged model and each file,
the same figures `orpo score` gives, and --keep-accuracy choosing the file the Modelfile uses."""

from __future__ import annotations

import json
import random
import subprocess

import numpy as np
import pytest
import tiny
import torch
from test_cli import BIN, _env
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo_plugin.core.rows import load_pairs
from serve.scoring import pair_ids

QUANTS = ("f16", "q8_0", "q4_k_m")
WORDS = "the of to and in is it you that was for on are with as his they at one have this".split()


def _orpo(*args):
    return subprocess.run([str(BIN / "orpo"), *map(str, args)], env=_env(), capture_output=True, text=True, timeout=900)


def _average(logprobs: np.ndarray, start: int, answer: list[int]) -> float:
    """Mean log-prob of the answer's tokens, from a [positions, vocab] array of log-probs."""
    return float(np.mean([logprobs[start + k - 1, token] for k, token in enumerate(answer)]))


def _reference(pairs, tokenizer, hf=None, gguf=None) -> list[str]:
    """Which answer each pair prefers (higher mean log-prob), computed here without the project's
    scorers: transformers' full-sequence logits, or llama-cpp-python's own eval with logits_all.
    Only the token ids come from the project (training's tokenization, which scoring defines)."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=512, logits_all=True, n_threads=2, verbose=False) if gguf else None
    preferred = []
    for pair in pairs:
        prompt, chosen, rejected = pair_ids(tokenizer, pair)
        means = []
        for answer in (chosen, rejected):
            ids = prompt + answer
            if llm is None:
                with torch.no_grad():
                    logits = hf(torch.tensor([ids])).logits[0].double()
                logprobs = torch.log_softmax(logits, -1).numpy()
            else:
                llm.reset()
                llm.eval(ids)
                scores = llm.scores[: len(ids)].astype(np.float64)
                logprobs = scores - np.logaddexp.reduce(scores, axis=-1, keepdims=True)
            means.append(_average(logprobs, len(prompt), answer))
        preferred.append("chosen" if means[0] > means[1] else "rejected")
    if llm is not None:
        llm.close()
    return preferred


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A random model 256 wide (so that q4_k_m really quantizes to 4 bits) and held-out pairs built
    so that q4_k_m loses accuracy: pairs on which the merged model, f16 and q8_0 all agree, oriented
    so that the merged model prefers the chosen answer, and among them a few that q4_k_m flips."""
    root = tmp_path_factory.mktemp("preference")
    tiny.build_model("llama", root / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    first = root / "first"
    proc = _orpo(
        "merge-and-quantize", "--base", root / "hf", "--out", first, *[a for q in QUANTS for a in ("--quant", q)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    rng = random.Random(0)
    rows = [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            "chosen": rng.choice(WORDS),
            "rejected": rng.choice(WORDS),
        }
        for _ in range(400)
    ]
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    (root / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(root / "candidates.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), dtype=torch.float32).eval()
    merged = _reference(pairs, tokenizer, hf=hf)
    files = {quant: _reference(pairs, tokenizer, gguf=first / f"model-{quant}.gguf") for quant in QUANTS}
    kept = [i for i in range(len(rows)) if merged[i] == files["f16"][i] == files["q8_0"][i]]
    flipped = [i for i in kept if files["q4_k_m"][i] != merged[i]][:6]
    agreed = [i for i in kept if files["q4_k_m"][i] == merged[i]][:30]
    assert len(flipped) >= 2 and len(agreed) == 30, (len(flipped), len(agreed))
    chosen = [
        dict(rows[i])
        if merged[i] == "chosen"
        else dict(rows[i], chosen=rows[i]["rejected"], rejected=rows[i]["chosen"])
        for i in sorted(agreed + flipped)
    ]
    (root / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return {"root": root, "hf": root / "hf", "pairs": root / "held_out.jsonl", "flipped": len(flipped)}


def test_keep_accuracy_picks_the_smallest_file_that_keeps_it_and_the_figures_equal_orpo_score(case):
    out = case["root"] / "export"
    # fmt: off
    proc = _orpo("merge-and-quantize", "--base", case["hf"], "--out", out, *[a for q in QUANTS for a in ("--quant", q)],
                 "--eval-pairs", case["pairs"], "--keep-accuracy", "0.99")
    # fmt: on
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    preference = report["preference"]
    models = preference["models"]
    n = 30 + case["flipped"]
    assert preference["pairs"] == n and preference["reference"] == "the merged model"
    assert models["merged"]["accuracy"] == 1.0 and models["f16"]["accuracy"] == models["q8_0"]["accuracy"] == 1.0
    assert models["q4_k_m"]["accuracy"] == pytest.approx(30 / n) and models["q4_k_m"]["kept"] < 0.99
    assert models["q4_k_m"]["agreement"] == pytest.approx(30 / n)
    # q8_0 is smaller than f16 and keeps it all; q4_k_m is smaller still but does not.
    assert report["files"]["q4_k_m"]["bytes"] < report["files"]["q8_0"]["bytes"] < report["files"]["f16"]["bytes"]
    assert preference["chosen"] == report["modelfile"]["from"] == "model-q8_0.gguf"
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")
    assert "model-q8_0.gguf is the smallest file that keeps at least 99.0% of the merged model's" in proc.stderr
    assert "| model-q4_k_m.gguf |" in proc.stdout and "| merged | - | 1.000 |" in proc.stdout

    # Each file's figures are `orpo score`'s on the same pairs and files.
    scored = _orpo(
        "score",
        *[out / f"model-{q}.gguf" for q in QUANTS],
        "--pairs",
        case["pairs"],
        "--report",
        case["root"] / "score.json",
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    for quant, m in zip(QUANTS, json.loads((case["root"] / "score.json").read_text())["models"]):
        assert m["accuracy"] == models[quant]["accuracy"], quant
        assert m["mean_log_odds_ratio"] == pytest.approx(models[quant]["mean_log_odds_ratio"], abs=1e-9), quant


def test_keep_accuracy_that_no_file_keeps_points_at_the_best(case):
    out = case["root"] / "only-q4"
    # fmt: off
    proc = _orpo("merge-and-quantize", "--base", case["hf"], "--out", out, "--quant", "q4_k_m", "--quant", "q8_0",
                 "--eval-pairs", case["pairs"], "--keep-accuracy", "1")
    # fmt: on
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model-q8_0.gguf is the smallest file that keeps at least 100.0%" in proc.stderr
    out = case["root"] / "none"
    proc = _orpo(
        "merge-and-quantize",
        "--base",
        case["hf"],
        "--out",
        out,
        "--quant",
        "q4_k_m",
        "--eval-pairs",
        case["pairs"],
        "--keep-accuracy",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no file keeps 100.0% of the merged model's preference accuracy; the best, model-q4_k_m.gguf" in proc.stderr
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q4_k_m.gguf")


def test_keep_accuracy_without_pairs_and_a_bad_pairs_file_are_refused_before_anything_is_written(case, tmp_path):
    out = tmp_path / "export"
    proc = _orpo("merge-and-quantize", "--base", case["hf"], "--out", out, "--quant", "f16", "--keep-accuracy", "0.99")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "Error: --keep-accuracy needs held-out preference pairs: pass --eval-pairs FILE (axolotl merge-and-quantize "
        "also reads the config's test_datasets)"
    )
    assert not out.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = _orpo("merge-and-quantize", "--base", case["hf"], "--out", out, "--quant", "f16", "--eval-pairs", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not out.exists()
    assert (
        f"{bad} row 1 (line 2): field 'rejected': missing field" in proc.stderr and "--on-bad-row skip" in proc.stderr
    )
