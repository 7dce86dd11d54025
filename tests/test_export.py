"""merge-and-quantize through both CLIs: outputs, parity report, Modelfile, faults."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import gguf
import llama_cpp
import pytest
from helpers import with_architecture
from test_cli import BIN, _env, _train, _tiny_config
from test_merge_quantize import _random_adapter

import tiny


def _orpo(*args, timeout=600):
    return subprocess.run([str(BIN / "orpo"), *map(str, args)], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_axolotl_merge_and_quantize_after_training_gives_a_gguf_that_chats(tmp_path, tiny_default):
    config = _tiny_config(tmp_path, tiny_default, max_steps=4, test_datasets=None, eval_steps=None)
    _train(config, "--launcher", "python")
    proc = subprocess.run([str(BIN / "axolotl"), "merge-and-quantize", str(config), "--quant", "f16",
                           "--quant", "q8_0"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "gguf"
    report = json.loads((out / "export_report.json").read_text())
    assert set(report["files"]) == {"f16", "q8_0"} and report["adapter"].endswith("out")
    for quant in ("f16", "q8_0"):
        assert report["models"][quant]["tokens_identical"]
    # The demo model's wide init (0.1) gives sharp distributions: q8_0 moves them by about 1e-3.
    assert report["models"]["f16"]["mean_kl"] < 1e-5 and report["models"]["q8_0"]["mean_kl"] < 1e-2
    assert "| model-q8_0.gguf |" in proc.stdout
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")
    llm = llama_cpp.Llama(model_path=str(out / "model-q8_0.gguf"), n_ctx=128, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        llm.close()


@pytest.fixture()
def adapter(model_dirs, tmp_path):
    return _random_adapter(model_dirs["qwen2"], tmp_path / "adapter")


def test_orpo_merge_and_quantize_and_its_refusals(model_dirs, adapter, tmp_path):
    out = tmp_path / "export"
    args = ["merge-and-quantize", "--base", model_dirs["qwen2"], "--adapter", adapter, "--out", out]
    done = _orpo(*args, "--quant", "q8_0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export_report.json", "model-q8_0.gguf"]

    again = _orpo(*args, "--quant", "q8_0")
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert _orpo(*args, "--quant", "f16", "--force").returncode == 0
    assert (out / "model-f16.gguf").exists() and not (out / "model-q8_0.gguf").exists()

    for extra, message in ((["--quant", "q4_k_xl"], "unknown quantization q4_k_xl; choose from"),):
        bad = _orpo(*args, *extra, "--force")
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "no-adapter").mkdir()
    missing = _orpo("merge-and-quantize", "--base", model_dirs["qwen2"], "--adapter", tmp_path / "no-adapter",
                    "--out", tmp_path / "x")
    assert missing.returncode == 1 and "no adapter_config.json" in missing.stderr


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3"])
def test_a_random_lora_on_each_fixture_is_merged_and_exported_faithfully(arch, model_dirs, tmp_path):
    from serve.export import export

    adapter = _random_adapter(model_dirs[arch], tmp_path / "adapter")
    report = export(model_dirs[arch], adapter, tmp_path / "out", ["f32", "q8_0"], progress=lambda msg: None)
    for quant, max_kl in (("f32", 1e-6), ("q8_0", 1e-3)):
        assert report["models"][quant]["tokens_identical"], quant
        assert report["models"][quant]["mean_kl"] < max_kl, (quant, report["models"][quant])
        assert report["models"][quant]["ok"] and report["models"][quant]["long"]["tokens"] == 1536, quant
    assert report["failed_checks"] == []
    plain = export(model_dirs[arch], None, tmp_path / "plain", ["f32"], progress=lambda msg: None)
    assert plain["models"]["f32"]["mean_kl"] < 1e-6  # and the adapter really moved the model:
    assert (tmp_path / "out" / "model-f32.gguf").read_bytes() != (tmp_path / "plain" / "model-f32.gguf").read_bytes()


def test_unsupported_architecture_names_the_supported_ones(model_dirs, tmp_path):
    odd = with_architecture(model_dirs["llama"], tmp_path / "odd", "GPTNeoXForCausalLM")
    proc = _orpo("merge-and-quantize", "--base", odd, "--out", tmp_path / "x", "--quant", "f16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, " \
        "Qwen3ForCausalLM, Gemma3ForCausalLM" \
        in proc.stderr and "register_architectures hook" in proc.stderr


def test_a_disk_write_failure_is_one_clear_error(model_dirs, tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, like a full disk would."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "export"
    proc = subprocess.run([str(BIN / "orpo"), "merge-and-quantize", "--base", str(model_dirs["llama"]), "--out",
                           str(out), "--quant", "f32"], env=_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=small_files)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"Error: could not write {out}" in proc.stderr and "rerun with --force" in proc.stderr
    assert not list(out.glob("*.gguf")) and not list(out.glob("*.partial"))


def test_a_killed_export_leaves_no_truncated_file_and_a_rerun_completes(tmp_path):
    tiny.build_model("llama", tmp_path / "m", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                     num_attention_heads=8)
    out = tmp_path / "export"
    args = ["merge-and-quantize", "--base", tmp_path / "m", "--out", out, "--quant", "f32", "--quant", "f16",
            "--quant", "q8_0", "--quant", "q4_k_m", "--quant", "q6_k"]
    proc = subprocess.Popen([str(BIN / "orpo"), *map(str, args)], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.glob("*.partial")) and not any(out.glob("model-f32.gguf")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in out.glob("*.gguf"):  # whatever has a final name is complete
        gguf.GGUFReader(str(path))
    assert not (out / "export_report.json").exists()
    rerun = _orpo(*args, "--force")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(out.glob("*.partial")) and not list(out.glob(".work-*"))
    for path in out.glob("*.gguf"):
        gguf.GGUFReader(str(path))
    assert len(list(out.glob("model-*.gguf"))) == 5


def test_the_report_catches_a_rope_the_gguf_does_not_reproduce(tmp_path, tokenizer, monkeypatch):
    """The long sequence catches a RoPE scaling the GGUF lacks, and says where it is worst."""
    from serve import rope
    from serve.export import export

    tiny.build_model("llama", tmp_path / "hf", tokenizer=tokenizer, initializer_range=0.1, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256, "rope_theta": 500000.0})
    good = export(tmp_path / "hf", None, tmp_path / "good", ["f32"], progress=lambda msg: None)
    assert good["models"]["f32"]["ok"] and good["failed_checks"] == []
    monkeypatch.setitem(rope.SCALINGS, "llama3", lambda writer, params, head_dim: None)  # the old converter
    bad = export(tmp_path / "hf", None, tmp_path / "bad", ["f32"], progress=lambda msg: None)
    long = bad["models"]["f32"]["long"]
    assert not long["ok"] and long["mean_kl"] > 100 * good["models"]["f32"]["long"]["mean_kl"]
    assert long["worst_window"][0] >= 256 and long["worst_window_kl"] > long["first_window_kl"]
    assert len(bad["failed_checks"]) == 1 and "model-f32.gguf: mean next-token KL" in bad["failed_checks"][0] \
        and "over a 1536-token sequence, above 1e-04 for f32" in bad["failed_checks"][0]
    assert json.loads((tmp_path / "bad" / "export_report.json").read_text())["failed_checks"] == bad["failed_checks"]
    from click.testing import CliRunner

    from serve.cli import main

    console = CliRunner().invoke(main, ["merge-and-quantize", "--base", str(tmp_path / "hf"), "--out",
                                        str(tmp_path / "cli"), "--quant", "f32"])
    assert console.exit_code == 0 and f"orpo: CHECK FAILED: {bad['failed_checks'][0]}" in console.output


REFUSES_SYSTEM = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                  "{% elif message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
                  "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


def test_a_chat_template_that_refuses_system_turns_exports_completely(model_dirs, tmp_path):
    """Mistral-Instruct v0.1/v0.2 ship such a template: GGUF, Modelfile and report are all written."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dirs["mistral"], tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    tokenizer.chat_template = REFUSES_SYSTEM
    tokenizer.save_pretrained(str(tmp_path / "hf"))
    proc = _orpo("merge-and-quantize", "--base", tmp_path / "hf", "--out", tmp_path / "out", "--quant", "f16")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model-f16.gguf", "Modelfile", "export_report.json"}
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["texts"] == 3 and report["models"]["f16"]["tokens_identical"]  # one chat sample, two texts
    assert "# Chat template family: mistral_v1" in (tmp_path / "out" / "Modelfile").read_text()
