"""Test fixtures: tiny random models of the architectures the exporter supports, and tokenizers of
the kinds real checkpoints ship, all built locally on the demo's builders (orpo_demo.build)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from orpo_demo.build import (  # noqa: F401
    CHATML_TEMPLATE,
    DEMO_MODEL,
    SPECIAL_TOKENS,
    _corpus,
    build_default,
    build_tokenizer,
    conversion_pairs,
    write_jsonl,
)
from orpo_demo.build import build_model as build_spec

# Llama 3.1's RoPE scaling (its config.json as transformers 5 saves it), over an original context of
# 256 so that the fixtures' long sequences reach far past it.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
    "rope_theta": 500000.0,
}
# Widths are multiples of 32 so that GGUF block quantization applies (see serve/).
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# fmt: off
ARCHITECTURES = {
    "llama": dict(_SMALL, cls="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": dict(_SMALL, cls="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(_SMALL, cls="MistralForCausalLM", num_key_value_heads=1, tie_word_embeddings=False),
    "qwen2": dict(_SMALL, cls="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    # Qwen3 ships head_dim 128 with hidden 4096 / 32 heads; here 32 with 64 / 4 (hidden/heads = 16).
    "qwen3": dict(_SMALL, cls="Qwen3ForCausalLM", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    # Gemma 3 text: five sliding-window layers, then a global one (its real pattern); a window of 16
    # so the fixtures' sequences cross it. query_pre_attn_scalar = head_dim, as Gemma 3 1B-12B ship.
    "mistral-window": dict(_SMALL, cls="MistralForCausalLM", num_key_value_heads=1, sliding_window=16),
    "gemma3": dict(cls="Gemma3ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=16, tie_word_embeddings=True),
    "demo": DEMO_MODEL,
}
# fmt: on


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def build_spm_tokenizer(out_dir: str | Path | None, vocab_size: int = 600, seed: int = 0):
    """A SentencePiece-style tokenizer as Llama-2 and Mistral v0.1 ship it in tokenizer.json: BPE
    over "▁"-joined words with byte fallback (<0x00>..<0xFF> in the vocabulary), <s> added in
    front of every encoding, </s> as EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(byte_tokens), special_tokens=specials, limit_alphabet=80, show_progress=False
    )
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    draft.train_from_iterator([line for line in _corpus(3000, seed) if "<|" not in line], trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    # Ids as in Llama-2: specials, then the 256 byte tokens, then the learned pieces.
    order = (
        specials
        + byte_tokens
        + [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    )
    vocab = {token: i for i, token in enumerate(order)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = MISTRAL_TEMPLATE
    hf.model_max_length = 2048
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def build_model(arch: str, out_dir: str | Path, tokenizer=None, seed: int = 0, **overrides):
    """Random-init model of a fixture architecture, saved with its tokenizer to out_dir."""
    return build_spec(dict(ARCHITECTURES[arch], **overrides), out_dir, tokenizer=tokenizer, seed=seed)


def arithmetic_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs with a crisp right answer: chosen is correct, rejected is off by a little."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        question = f"What is {a} + {b}?"
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append(
            {
                "chosen": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}"},
                ],
                "rejected": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"{a} + {b} = {wrong}"},
                ],
            }
        )
    return rows


def build_tekken_tokenizer(out_dir: str | Path | None):
    """Mistral's real tekken tokenizer (Nemo, 131,072 tokens), from the file mistral-common ships
    (Axolotl pins it), converted by transformers as Mistral's hub repositories convert it."""
    from importlib import resources

    from axolotl.utils.chat_templates import get_chat_template
    from transformers.integrations.mistral import convert_tekken_tokenizer

    path = resources.files("mistral_common") / "data" / "tekken_240718.json"
    tokenizer = convert_tekken_tokenizer(str(path))
    tokenizer.chat_template = get_chat_template("mistral_v3_tekken")
    tokenizer.model_max_length = 2048
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def one_token_model(out_dir: str | Path, token: str, arch: str = "llama", **overrides):
    """A model whose every greedy step emits `token` (added to the vocabulary if new), saved with
    its tokenizer: all hidden states equal one vector v (one embedding for every token, attention
    and MLP outputs zeroed), and that token's LM-head row is the normalised v."""
    import torch

    tokenizer = build_tokenizer(None)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    model = build_model(arch, None, tokenizer=tokenizer, **overrides)
    token_id = tokenizer.convert_tokens_to_ids(token)
    with torch.no_grad():
        v = torch.randn(model.config.hidden_size)
        model.get_input_embeddings().weight[:] = v
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        normed = model.model.norm(v[None])[0]
        model.lm_head.weight[token_id] = 10 * normed / normed.norm()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
