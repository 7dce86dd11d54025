"""The one end-to-end test on a real pretrained model: `make demo`'s pipeline on SmolLM2-135M-Instruct,
shortened (4 training steps, a q8_0 export, 4 held-out questions), run from a non-editable install of
the project outside the source tree. What it serves is checked against references other than our
own code: the chat reply against llama-cpp-python's own chat completion on the same file, the
served scores against transformers' log-probs of the trained adapter (`orpo score`'s HF path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _env

from orpo_demo import task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project as a wheel installs it (no source tree), first on sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=600,
    )
    env = dict(_env(), PYTHONPATH=str(target))
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import orpo_demo, orpo_plugin, serve; print(orpo_demo.__file__, orpo_plugin.__file__, serve.__file__)",
        ],
        cwd=target.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(path.startswith(str(target)) for path in where.stdout.split())
    return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory, installed):
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "orpo_demo", "--out", str(out), "--steps", "4", "--quant", "q8_0", "--questions", "4"],
        cwd=out.parent,
        env=installed,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def test_the_real_model_trains_exports_and_passes_every_check(demo):
    out, stdout, summary = demo
    assert [m["name"] for m in summary["models"]] == [
        "base (GGUF as shipped, Q4_1)",
        "trained (HF + LoRA)",
        "GGUF q8_0",
    ]
    config = json.loads((out / "model" / "config.json").read_text())
    assert (config["architectures"], config["num_hidden_layers"], config["hidden_size"]) == (
        ["LlamaForCausalLM"],
        30,
        576,
    )
    history = [json.loads(line) for line in (out / "output" / "orpo_log_history.jsonl").read_text().splitlines()]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 4]  # before the first step and after the last
    # Four steps already move the held-out preference.
    assert evals[1]["eval_log_odds_ratio"] > evals[0]["eval_log_odds_ratio"]
    export = json.loads((out / "output" / "gguf" / "export_report.json").read_text())
    assert export["failed_checks"] == [] and export["models"]["q8_0"]["tokens_identical"]
    assert export["models"]["q8_0"]["mean_kl"] < 1e-2
    assert (out / "output" / "gguf" / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")
    assert (
        'SYSTEM """You are a helpful AI assistant named SmolLM' in (out / "output" / "gguf" / "Modelfile").read_text()
    )
    assert summary["targets"] == {}  # no q4_k_m in a shortened run
    assert "| total |" in stdout and (out / "transcript.md").read_text().count("\n") == 2 + 4


def test_served_chat_equals_llama_cpp_pythons_own_chat_completion(demo):
    """orpo serve renders the chat template (default system prompt included) and decodes greedily;
    llama-cpp-python's own chat completion on the same file must give the same reply."""
    from llama_cpp import Llama

    out, _, summary = demo
    llm = Llama(
        str(out / "output" / "gguf" / "model-q8_0.gguf"), n_ctx=task.GENERATION["n_ctx"], n_threads=2, verbose=False
    )
    try:
        for question, reply in zip(summary["questions"], summary["answers"]["GGUF q8_0"]["replies"]):
            theirs = llm.create_chat_completion(
                [{"role": "user", "content": question}], temperature=0.0, max_tokens=task.GENERATION["max_tokens"]
            )
            assert reply == theirs["choices"][0]["message"]["content"], question
    finally:
        llm.close()


def test_served_scores_agree_with_transformers_on_the_trained_adapter(demo):
    """/v1/score on the q8_0 file against `orpo score` of the adapter through transformers (fp32):
    the same pairs, the same mean log-probs within what q8_0 moves them."""
    out, _, summary = demo
    served = summary["served_scores"]
    assert served["model"] == "GGUF q8_0" and len(served["results"]) == 3
    report = json.loads((out / "score_report.json").read_text())
    adapter = next(m for m in report["models"] if m["kind"] == "adapter")
    for mine, reference in zip(served["results"], adapter["results"]):
        for side in ("chosen", "rejected"):
            assert mine[side]["n_tokens"] == reference[side]["n_tokens"]
            assert abs(mine[side]["avg_logprob"] - reference[side]["avg_logprob"]) < 0.05, (side, mine, reference)
        assert mine["preferred"] == reference["preferred"]
