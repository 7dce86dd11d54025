"""LoRA merge in full precision, and llama.cpp's K-quants on top of our GGUF."""

from __future__ import annotations

import gguf
import llama_cpp
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import tiny
from serve.convert import convert
from serve.merge import MergeError, merge_adapter
from serve.quantize import QuantizeError, quantize


def _random_adapter(model_dir, out_dir, seed=0, targets=("q_proj", "v_proj", "down_proj")):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(str(out_dir))
    return out_dir


@pytest.mark.parametrize("arch, targets", [
    ("llama", ("q_proj", "v_proj", "down_proj")),
    ("llama-tied", ("q_proj", "v_proj", "down_proj")),
    ("qwen2", ("q_proj", "v_proj", "down_proj")),
    ("mistral", ("q_proj", "k_proj", "o_proj", "gate_proj")),
    # An adapter on one side of a tied pair: the merged model must untie, not move both.
    ("llama-tied", ("q_proj", "lm_head")),
    ("qwen2", ("embed_tokens", "v_proj")),
])
def test_merged_model_equals_the_adapter_forward(arch, targets, model_dirs, tmp_path):
    adapter = _random_adapter(model_dirs[arch], tmp_path / "adapter", targets=targets)
    merged_dir = merge_adapter(model_dirs[arch], adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 9, 40, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, str(adapter))(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(model_dirs[arch]), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-4)  # the adapter really changes the model
    assert (merged_dir / "tokenizer.json").is_file() and not (tmp_path / "merged.partial").exists()


def test_merge_errors_name_the_problem(model_dirs, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no adapter_config.json"):
        merge_adapter(model_dirs["llama"], tmp_path / "empty", tmp_path / "out")
    wide = tmp_path / "wide"
    tiny.build_model("llama", wide, hidden_size=96, intermediate_size=192)  # another base
    adapter = _random_adapter(wide, tmp_path / "adapter")
    with pytest.raises(MergeError, match="does not fit base model"):
        merge_adapter(model_dirs["llama"], adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


def test_unknown_quant_lists_the_choices(tmp_path):
    with pytest.raises(QuantizeError, match="choose from .*q4_k_m"):
        quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "q4_k_xl")
