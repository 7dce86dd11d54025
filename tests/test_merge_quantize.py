"""The streaming LoRA merge against PEFT, and llama.cpp's K-quants on top of our GGUF."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import llama_cpp
import numpy as np
import pytest
import tiny
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from serve.export.convert import convert
from serve.export.merge import MergeError, merged
from serve.export.parity import reference_model
from serve.export.quantize import QuantizeError, quantize


def _random_adapter(model_dir, out_dir, seed=0, targets=("q_proj", "v_proj", "down_proj"), **lora):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = get_peft_model(
        model,
        LoraConfig(
            **dict(dict(r=4, lora_alpha=8), **lora),
            target_modules=list(targets),
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    if lora.get("use_dora"):  # DoRA starts at the weights' own norms; move the magnitudes too
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.1 * torch.randn_like(param))
    peft.save_pretrained(str(out_dir))
    return out_dir


def _sharded(model_dir, out_dir):
    """The same model saved as several shards with a model.safetensors.index.json (as 8B checkpoints are)."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.save_pretrained(str(out_dir), max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            (out_dir / name).write_bytes((model_dir / name).read_bytes())
    assert len(list(out_dir.glob("*.safetensors"))) > 2 and (out_dir / "model.safetensors.index.json").is_file()
    return out_dir


CASES = {
    "attention and MLP": ("llama", ("q_proj", "v_proj", "down_proj"), {}),
    "every linear, rsLoRA, per-module rank and alpha": (
        "mistral",
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        dict(use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 32}),
    ),
    "qwen2 biases untouched, tied": ("qwen2", ("q_proj", "v_proj", "down_proj"), {}),
    "DoRA": ("llama", ("q_proj", "v_proj", "up_proj"), dict(use_dora=True)),
    "DoRA on the embedding": ("llama", ("embed_tokens", "q_proj"), dict(use_dora=True)),
    # An adapter on one side of a tied pair: the merged model must untie, not move both.
    "lm_head of a tied model": ("llama-tied", ("q_proj", "lm_head"), {}),
    "embed_tokens of a tied model": ("qwen2", ("embed_tokens", "v_proj"), {}),
    "modules_to_save": ("llama", ("q_proj",), dict(modules_to_save=["lm_head", "embed_tokens"])),
    "modules_to_save of a tied model": ("gemma3", ("q_proj",), dict(modules_to_save=["embed_tokens"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_merge_is_the_adapter_model(case, model_dirs, tmp_path):
    """Every merged tensor equals PEFT's merge_and_unload() (fp32) where PEFT merges faithfully, and the
    model read back from the merged tensors computes what the unmerged adapter model does."""
    arch, targets, lora = CASES[case]
    adapter = _random_adapter(model_dirs[arch], tmp_path / "adapter", targets=targets, **lora)
    ours = merged(model_dirs[arch], adapter)
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([[1, 5, 9, 40, 2, 7, 11, 3]])
    with torch.no_grad():
        want = peft(ids).logits
        got = reference_model(ours)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, want, atol=1e-4)  # the adapter really changes the model
    if "tied" not in case:  # PEFT's merge moves both sides of a tied pair; elsewhere it is the reference
        state = peft.merge_and_unload().state_dict()
        assert set(ours.names()) <= set(state) and set(state) - set(ours.names()) <= {"lm_head.weight"}
        for name in ours.names():
            np.testing.assert_allclose(ours.rows(name), state[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_sharded_checkpoints_merge_slice_by_slice(model_dirs, tmp_path):
    """Shards with an index, read a few rows at a time (the converter's slices), give PEFT's merge."""
    sharded = _sharded(model_dirs["llama"], tmp_path / "sharded")
    adapter = _random_adapter(sharded, tmp_path / "adapter", targets=("q_proj", "k_proj", "lm_head", "embed_tokens"))
    ours = merged(sharded, adapter)
    base = AutoModelForCausalLM.from_pretrained(str(sharded), dtype=torch.float32)
    state = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for name in ours.names():
        rows = ours.shape(name)[0]
        pieces = np.concatenate([ours.rows(name, start, start + 7) for start in range(0, rows, 7)])
        np.testing.assert_allclose(pieces, state[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_vocabulary_resized_in_training_is_exported(model_dirs, tmp_path):
    """Axolotl adds tokens (resize_token_embeddings) and trains the embeddings: PEFT saves the resized
    matrices beside the adapter, and the tokenizer is saved there too. The export takes both."""
    from transformers import AutoTokenizer

    from serve.export.pipeline import export

    model = AutoModelForCausalLM.from_pretrained(str(model_dirs["llama"]), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dirs["llama"]))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|/tool|>"]})
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=32)
    torch.manual_seed(0)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "embed_tokens", "lm_head"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    peft.save_pretrained(str(tmp_path / "adapter"))
    tokenizer.save_pretrained(str(tmp_path / "adapter"))
    ours = merged(model_dirs["llama"], tmp_path / "adapter")
    vocab = peft.get_input_embeddings().weight.shape[0]
    assert ours.config["vocab_size"] == vocab > len(tokenizer) - 2
    ids = torch.tensor([[1, 5, len(tokenizer) - 2, 40, len(tokenizer) - 1, 7]])  # the new tokens
    with torch.no_grad():
        torch.testing.assert_close(reference_model(ours)(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-5)
    report = export(model_dirs["llama"], tmp_path / "adapter", tmp_path / "out", ["f32"], progress=lambda m: None)
    assert report["failed_checks"] == [] and report["models"]["f32"]["mean_kl"] < 1e-6
    reader = gguf.GGUFReader(str(tmp_path / "out" / "model-f32.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == vocab and bytes(tokens.parts[tokens.data[len(tokenizer) - 2]]) == b"<|tool|>"


MEASURE = """
import json, sys
from pathlib import Path
from serve.export.convert import convert
from serve.export.memory import peak_rss, reset_peak
from serve.export.merge import merged
source = merged(sys.argv[1], sys.argv[2])
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(sys.argv[1])  # libraries and the tokenizer are not the merge
reset_peak()
start = peak_rss()
convert(source, Path(sys.argv[3]), "f16")
print(json.dumps({"start": start, "peak": peak_rss()}))
"""


def test_memory_stays_bounded_far_below_the_model(tmp_path):
    """A 460 MB (fp32 in memory) model merges and converts with a peak far below its size: only slices
    of one tensor are ever held."""
    tiny.build_model(
        "llama",
        tmp_path / "m",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    adapter = _random_adapter(
        tmp_path / "m",
        tmp_path / "adapter",
        targets=(
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
            "embed_tokens",
        ),
    )
    fp32 = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "m"), str(adapter), str(tmp_path / "o.gguf")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert fp32 > 400e6 and rss["peak"] - rss["start"] < fp32 / 8, (rss, fp32)
    assert (tmp_path / "o.gguf").stat().st_size > fp32 / 2 * 0.99


def test_merge_errors_name_the_problem(model_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match=r"no adapter_config.json"):
        merged(model_dirs["llama"], tmp_path / "empty")
    wide = tmp_path / "wide"
    tiny.build_model("llama", wide, hidden_size=96, intermediate_size=192)  # another base
    adapter = _random_adapter(wide, tmp_path / "adapter")
    with pytest.raises(
        MergeError,
        match=r"does not fit base model .*its LoRA on model.layers.0.\S+.weight "
        r"is for a \[96, \d+\] matrix, the base has it as \[64, \d+\]",
    ):
        merged(model_dirs["llama"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, peft_type="IA3")))
    with pytest.raises(MergeError, match=r"peft_type 'IA3' .* is not supported"):
        merged(wide, adapter)


def test_q4_k_m_writes_real_k_quant_tensors_and_keeps_the_template(tmp_path, capsys):
    """256-wide rows: smaller ones make llama.cpp fall back (Q4_K -> Q5_0)."""
    tiny.build_model("llama", tmp_path / "m", hidden_size=256, intermediate_size=512, num_attention_heads=4)
    f16 = convert(tmp_path / "m", tmp_path / "model-f16.gguf", "f16")
    out = quantize(f16, tmp_path / "model-q4_k_m.gguf", "q4_k_m", threads=2, progress=True)
    assert "quantize q4_k_m" in capsys.readouterr().err  # the progress bar
    reader = gguf.GGUFReader(str(out))
    kinds = {t.tensor_type for t in reader.tensors}
    assert gguf.GGMLQuantizationType.Q4_K in kinds
    field = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(field.parts[field.data[0]]).decode()
    assert out.stat().st_size < f16.stat().st_size / 2
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    try:
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply["choices"][0]["message"]["role"] == "assistant"
    finally:
        llm.close()


def test_unknown_quant_lists_the_choices_and_a_failed_quantization_leaves_nothing(tmp_path):
    with pytest.raises(QuantizeError, match=r"choose from .*q4_k_m"):
        quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "q4_k_xl")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(
        QuantizeError,
        match=r"llama.cpp could not quantize .*x.gguf to q4_k_m: llama_model_quantize: failed to quantize",
    ):
        quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
