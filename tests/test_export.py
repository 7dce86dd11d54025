"""merge-and-quantize through both CLIs: outputs, parity report, Modelfile, faults."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import gguf
import llama_cpp
import pytest
import tiny
from helpers import with_architecture
from test_cli import BIN, _axolotl, _env, _tiny_config, _train
from test_merge_quantize import _random_adapter


def _orpo(*args, timeout=600):
    return subprocess.run(
        [str(BIN / "orpo"), *map(str, args)], env=_env(), capture_output=True, text=True, timeout=timeout
    )


def test_axolotl_merge_and_quantize_after_training_gives_a_gguf_that_chats(tmp_path, tiny_default):
    config = _tiny_config(tmp_path, tiny_default, max_steps=4, test_datasets=None, eval_steps=None)
    _train(config, "--launcher", "python")

    def axolotl():
        return _axolotl("merge-and-quantize", config, cwd=tmp_path)

    # The types come from the config's `export:` block, the one Axolotl 0.21's `axolotl export` reads.
    trained = config.read_text()
    config.write_text(trained + "export:\n  quantize: [Q8_0, Q9_K]\n")
    proc = axolotl()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{config}: export.quantize: Q9_K is not a type merge-and-quantize writes" in proc.stderr
    config.write_text(trained + "export:\n  outtype: f16\n  quantize: [Q8_0]\n  llama_cpp_dir: /nowhere\n")
    proc = axolotl()
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
    assert "| stage | seconds | peak RSS MiB |" in done.stdout and "| write model-q8_0.gguf |" in done.stdout

    again = _orpo(*args, "--quant", "q8_0")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert (
        f"{out} already has model-q8_0.gguf, Modelfile, export_report.json from an earlier export; pass --force "
        f"to replace them (nothing else in {out} is touched)" in again.stderr
    )
    assert _orpo(*args, "--quant", "f16", "--force").returncode == 0
    assert (out / "model-f16.gguf").exists() and (out / "model-q8_0.gguf").exists()  # not asked for: kept

    for extra, message in ((["--quant", "q4_k_xl"], "unknown quantization q4_k_xl; choose from"),):
        bad = _orpo(*args, *extra, "--force")
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "no-adapter").mkdir()
    missing = _orpo(
        "merge-and-quantize",
        "--base",
        model_dirs["qwen2"],
        "--adapter",
        tmp_path / "no-adapter",
        "--out",
        tmp_path / "x",
    )
    assert missing.returncode == 1 and "no adapter_config.json" in missing.stderr


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_force_never_touches_what_the_export_did_not_write(model_dirs, adapter, tmp_path):
    """--out at the adapter (or the base) is refused and both stay as they were; --force into a folder
    with other files replaces the export's own files only."""
    before = _tree(adapter), _tree(model_dirs["qwen2"])
    for out in (adapter, model_dirs["qwen2"]):
        # fmt: off
        proc = _orpo("merge-and-quantize", "--base", model_dirs["qwen2"], "--adapter", adapter, "--out", out,
                     "--quant", "f16", "--force")
        # fmt: on
        what = "adapter" if out == adapter else "base model"
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert (
            f"--out {out} is the {what} directory; write the export beside it, e.g. --out {out / 'gguf'}" in proc.stderr
        )
    assert (_tree(adapter), _tree(model_dirs["qwen2"])) == before

    shared = tmp_path / "shared"
    (shared / "notes").mkdir(parents=True)
    (shared / "notes" / "run.md").write_text("mine")
    (shared / "model-f16.gguf").write_text("an older export")
    (shared / "model-q6_k.gguf").write_text("another export, not asked for this time")
    # fmt: off
    args = ["merge-and-quantize", "--base", model_dirs["qwen2"], "--adapter", adapter, "--out", shared,
            "--quant", "f16"]
    # fmt: on
    assert "already has model-f16.gguf" in _orpo(*args).stderr
    assert (shared / "model-f16.gguf").read_text() == "an older export"
    done = _orpo(*args, "--force")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (shared / "notes" / "run.md").read_text() == "mine"
    assert (shared / "model-q6_k.gguf").read_text() == "another export, not asked for this time"
    gguf.GGUFReader(str(shared / "model-f16.gguf"))
    assert sorted(p.name for p in shared.iterdir()) == [
        "Modelfile",
        "export_report.json",
        "model-f16.gguf",
        "model-q6_k.gguf",
        "notes",
    ]


def test_a_hub_id_comes_from_the_local_cache_and_a_quantized_base_is_refused(model_dirs, tmp_path):
    """`base_model: org/name` as Axolotl configs have it: read from the hub cache (offline here)."""
    import shutil

    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(model_dirs["llama"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = dict(_env(), HF_HUB_CACHE=str(tmp_path / "hub"))  # offline, as every test runs

    def run(base, out):
        return subprocess.run(
            [str(BIN / "orpo"), "merge-and-quantize", "--base", base, "--out", str(out), "--quant", "f16"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    done = run("acme/tiny-llama", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["failed_checks"] == []
    missing = run("acme/not-cached", tmp_path / "x")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "acme/not-cached: not a local directory, and the hub copy could not be had" in missing.stderr

    quantized = tmp_path / "bnb"
    shutil.copytree(model_dirs["llama"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(
        json.dumps(dict(config, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}))
    )
    refused = run(str(quantized), tmp_path / "y")
    assert (
        refused.returncode == 1
        and f"{quantized} is a bitsandbytes-quantized checkpoint; export from the full-precision model it was made from"
        in refused.stderr
    )
    assert not (tmp_path / "y").exists()


def test_not_enough_disk_is_one_line_before_anything_is_written(model_dirs, tmp_path, monkeypatch):
    import shutil

    from serve.export import pipeline as exporting

    monkeypatch.setattr(
        exporting.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20)
    )
    with pytest.raises(
        exporting.ExportError,
        match=r"not enough disk space in .*out: the export needs about 0.0 GiB "
        r"\(model-q8_0.gguf 0.0 GiB, model-q4_k_m.gguf 0.0 GiB, temporary f16 "
        r"GGUF 0.0 GiB\) and 0.0 GiB is free; free some space or pick "
        r"another --out",
    ):
        exporting.export(model_dirs["llama"], None, tmp_path / "out", ["q8_0", "q4_k_m"], progress=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_k_quants_come_from_an_f16_file_and_every_tensor_is_checked(model_dirs, adapter, tmp_path):
    """Without f16 asked for, a temporary f16 GGUF feeds llama.cpp and is removed; every tensor of every
    file is compared (the K-quants against that f16 file)."""
    from serve.export.pipeline import export

    tiny.build_model("llama", tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    report = export(tmp_path / "m", None, tmp_path / "out", ["q8_0", "q4_k_m"], progress=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile",
        "export_report.json",
        "model-q4_k_m.gguf",
        "model-q8_0.gguf",
    ]
    n = len(gguf.GGUFReader(str(tmp_path / "out" / "model-q8_0.gguf")).tensors)
    tensors = report["tensors"]
    assert tensors["q8_0"]["checked"] == tensors["q4_k_m"]["checked"] == tensors["f16 (temporary)"]["checked"] == n
    assert (
        tensors["q8_0"]["reference"] == "merged weights"
        and tensors["q4_k_m"]["reference"] == "f16 GGUF, 1 in 4 row slices"
    )
    assert tensors["f16 (temporary)"]["worst_rel_rms"] < 1e-3 < tensors["q8_0"]["worst_rel_rms"] < 2e-2
    assert 2e-2 < tensors["q4_k_m"]["worst_rel_rms"] < 0.2 and tensors["q4_k_m"]["bound"] is None
    assert [s["stage"] for s in report["stages"]] == [
        "write model-q8_0.gguf",
        "write a temporary f16 GGUF for llama.cpp's quantizer",
        "quantize model-q4_k_m.gguf (from f16)",
        "check K-quant tensors against the f16 file",
        "check tokens and logits against the merged model",
    ]
    assert all(s["peak_rss_mib"] > 0 for s in report["stages"]) and report["failed_checks"] == []


def test_a_damaged_tensor_fails_the_check(model_dirs, tmp_path, monkeypatch):
    from serve.export import convert as converting
    from serve.export.pipeline import export

    encode = converting._encode
    monkeypatch.setattr(
        converting,
        "_encode",
        lambda data, kind, name: encode(data * 1.05 if name == "blk.1.ffn_down.weight" else data, kind, name),
    )
    report = export(model_dirs["llama"], None, tmp_path / "out", ["f16"], progress=lambda m: None)
    assert report["failed_checks"][0].startswith(
        "model-f16.gguf: tensor blk.1.ffn_down.weight differs from the "
        "merged weights by 5.00e-02 (relative RMS), above 1e-03 for f16"
    )


def test_an_abort_in_llama_cpp_fails_that_files_checks_and_the_report_is_still_written(
    model_dirs, tmp_path, monkeypatch
):
    """A byte-level vocabulary written as SentencePiece (what the converter did with the tokenizer
    transformers' GGUF loader writes): llama.cpp aborts the process that loads it ("SPM vocabulary,
    but newline token not found", SIGABRT). The checks run in a child, so the export goes on: the
    file's checks fail with llama.cpp's own words, and the report is written."""
    from orpo_plugin.core.rows import load_pairs
    from serve.export import vocabulary
    from serve.export.pipeline import export

    monkeypatch.setitem(vocabulary.WRITERS, "byte-level", vocabulary._write_sentencepiece_bpe)
    out = tmp_path / "out"
    pairs = tiny.arithmetic_pairs(2, seed=1)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pairs))
    held_out = load_pairs(tmp_path / "pairs.jsonl")
    report = export(model_dirs["llama"], None, out, ["f16"], progress=lambda m: None, eval_pairs=held_out)
    model = report["models"]["f16"]
    assert model["ok"] is False and not model["tokens_identical"]
    assert "newline token" in model["error"] and "signal 6" in model["error"], model["error"]
    assert model["error"].startswith(f"{out / 'model-f16.gguf'}: llama.cpp stopped while")
    assert "error" in report["preference"]["models"]["f16"]
    scoring, tokens = report["failed_checks"]
    assert tokens == model["error"] and scoring.endswith("unordered_map::at (signal 6) (in the preference check)")
    assert scoring.startswith(f"{out / 'model-f16.gguf'}: llama.cpp stopped while scoring: ")
    assert json.loads((out / "export_report.json").read_text())["failed_checks"] == report["failed_checks"]
    assert (out / "Modelfile").is_file()


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma3"])
def test_a_random_lora_on_each_fixture_is_merged_and_exported_faithfully(arch, model_dirs, tmp_path):
    from serve.export.pipeline import export

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
    assert (
        "GPTNeoXForCausalLM is not supported; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, Gemma3ForCausalLM"
        in proc.stderr
        and "register_architectures hook" in proc.stderr
    )


def test_a_disk_write_failure_is_one_clear_error(model_dirs, tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, like a full disk would."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "export"
    proc = subprocess.run(
        [
            str(BIN / "orpo"),
            "merge-and-quantize",
            "--base",
            str(model_dirs["llama"]),
            "--out",
            str(out),
            "--quant",
            "f32",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=small_files,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"Error: could not write {out}" in proc.stderr and "rerun with --force" in proc.stderr
    assert not list(out.glob("*.gguf")) and not list(out.glob("*.partial"))


def test_a_killed_export_leaves_no_truncated_file_and_a_rerun_completes(tmp_path):
    tiny.build_model(
        "llama", tmp_path / "m", hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8
    )
    out = tmp_path / "export"
    args = [
        "merge-and-quantize",
        "--base",
        tmp_path / "m",
        "--out",
        out,
        "--quant",
        "f32",
        "--quant",
        "f16",
        "--quant",
        "q8_0",
        "--quant",
        "q4_k_m",
        "--quant",
        "q6_k",
    ]
    proc = subprocess.Popen(
        [str(BIN / "orpo"), *map(str, args)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.glob("*.partial")) and not any(out.glob("model-f32.gguf")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for path in out.glob("*.gguf"):  # whatever has a final name is complete
        gguf.GGUFReader(str(path))
    assert not (out / "export_report.json").exists()
    stale = [p.name for p in out.glob("*.partial")]
    rerun = _orpo(*args, "--force")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(out.glob("*.partial")) and not list(out.glob(".work-*"))
    for name in stale:
        assert f"orpo: removed {name}, left by an export that was killed" in rerun.stderr
    for path in out.glob("*.gguf"):
        gguf.GGUFReader(str(path))
    assert len(list(out.glob("model-*.gguf"))) == 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_export_removes_its_temporary_files(sig, tmp_path):
    """SIGTERM (a scheduler's stop) and Ctrl-C, also while llama.cpp quantizes: exit 130, nothing left."""
    tiny.build_model(
        "llama", tmp_path / "m", hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8
    )
    out = tmp_path / "export"
    (out / "keep").mkdir(parents=True)
    proc = subprocess.Popen(
        [
            str(BIN / "orpo"),
            "merge-and-quantize",
            "--base",
            str(tmp_path / "m"),
            "--out",
            str(out),
            "--quant",
            "q4_k_m",
            "--quant",
            "q6_k",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("model-q4_k_m.gguf.*.partial")):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert f"orpo: interrupted; no temporary file is left in {out}" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep"]


def test_the_report_catches_a_rope_the_gguf_does_not_reproduce(tmp_path, tokenizer, monkeypatch):
    """The long sequence catches a RoPE scaling the GGUF lacks, and says where it is worst."""
    from serve.export import rope
    from serve.export.pipeline import export

    tiny.build_model(
        "llama",
        tmp_path / "hf",
        tokenizer=tokenizer,
        initializer_range=0.1,
        rope_parameters=tiny.LLAMA3_ROPE,
    )
    good = export(tmp_path / "hf", None, tmp_path / "good", ["f32"], progress=lambda msg: None)
    assert good["models"]["f32"]["ok"] and good["failed_checks"] == []
    monkeypatch.setitem(rope.SCALINGS, "llama3", lambda writer, params, head_dim: None)  # the old converter
    bad = export(tmp_path / "hf", None, tmp_path / "bad", ["f32"], progress=lambda msg: None)
    long = bad["models"]["f32"]["long"]
    assert not long["ok"] and long["mean_kl"] > 100 * good["models"]["f32"]["long"]["mean_kl"]
    assert long["worst_window"][0] >= 256 and long["worst_window_kl"] > long["first_window_kl"]
    assert (
        len(bad["failed_checks"]) == 1
        and "model-f32.gguf: mean next-token KL" in bad["failed_checks"][0]
        and "over a 1536-token sequence, above 1e-04 for f32" in bad["failed_checks"][0]
    )
    assert json.loads((tmp_path / "bad" / "export_report.json").read_text())["failed_checks"] == bad["failed_checks"]
    from click.testing import CliRunner

    from serve.cli import main

    console = CliRunner().invoke(
        main, ["merge-and-quantize", "--base", str(tmp_path / "hf"), "--out", str(tmp_path / "cli"), "--quant", "f32"]
    )
    assert console.exit_code == 0 and f"orpo: CHECK FAILED: {bad['failed_checks'][0]}" in console.output


REFUSES_SYSTEM = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% elif message['role'] == 'user' %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


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
