"""The embedded default: a tokenizer, tiny random models and preference data built locally.

Nothing here is downloaded. Tests, the example config and the demo build their model from
these functions, so every run starts from the same bytes (fixed seeds).

    python -m orpo_plugin.tiny build/tiny      # writes build/tiny/{model,data}
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Widths are multiples of 32 so that GGUF block quantization applies (see serve/).
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
ARCHITECTURES = {
    "llama": dict(_SMALL, cls="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=False),
    "llama-tied": dict(_SMALL, cls="LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral": dict(_SMALL, cls="MistralForCausalLM", num_key_value_heads=1, tie_word_embeddings=False),
    "qwen2": dict(_SMALL, cls="Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True),
    # The embedded default used by example_configs/tiny-cpu.yml.
    # A wider init than HF's 0.02: LoRA cannot train the LM head or the final norm, and at 0.02
    # the logits stay too small for the trained model to be confident (about -3.8 per token).
    "demo": dict(cls="LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.1),
}


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = (
        "the a of to and in is it you that he was for on are with as I his they be at one have "
        "this from or had by word but what some we can out other were all there when up use your "
        "how said an each she which do their time if will way about many then them write would "
        "like so these her long make thing see him two has look more day could go come did number "
        "sound no most people my over know water than call first who may down side been now find "
        "answer question sum plus minus equals result correct wrong please compute what's"
    ).split()
    lines = []
    for _ in range(n_lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-")
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {a + b if op == '+' else a - b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))).capitalize() + ".")
        lines.append(f"<|im_start|>user\n{lines[-2]}<|im_end|>\n<|im_start|>assistant\n{lines[-1]}<|im_end|>\n")
    return lines


# Qwen2's split pattern: one digit per token, so numbers are sequences a small model can copy.
SINGLE_DIGIT_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, seed: int = 0, bos_token: str | None = None,
                    single_digits: bool = False, extra_corpus: list[str] = ()):
    """Train a byte-level BPE tokenizer with ChatML specials; EOS is the end-of-turn token.
    bos_token (e.g. "<|endoftext|>") makes a Llama-style tokenizer that starts prompts with it;
    single_digits splits numbers into digits (GPT-2's pattern keeps digit runs together)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if single_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SINGLE_DIGIT_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(3000, seed) + list(extra_corpus), trainer=trainer)
    if bos_token:  # like Llama: the tokenizer itself starts every encoding with BOS
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=bos_token,
        additional_special_tokens=["<|im_start|>"],
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.model_max_length = 2048
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(byte_tokens), special_tokens=specials,
                                  limit_alphabet=80, show_progress=False)
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    draft.train_from_iterator([line for line in _corpus(3000, seed) if "<|" not in line], trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    # Ids as in Llama-2: specials, then the 256 byte tokens, then the learned pieces.
    order = specials + byte_tokens + [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])
                                      if t not in specials]
    vocab = {token: i for i, token in enumerate(order)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.chat_template = MISTRAL_TEMPLATE
    hf.model_max_length = 2048
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def build_model(arch: str, out_dir: str | Path, tokenizer=None, seed: int = 0, **overrides):
    """Random-init model of a fixture architecture, saved with its tokenizer to out_dir."""
    import torch
    import transformers

    spec = dict(ARCHITECTURES[arch], **overrides)
    cls = getattr(transformers, spec.pop("cls"))
    tokenizer = tokenizer or build_tokenizer(None)
    spec.setdefault("vocab_size", len(tokenizer))
    config = cls.config_class(
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **spec,
    )
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return model


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


# The demo task: unit conversion. The right answer copies the number and appends as many zeros
# as the unit pair says; the wrong one has a zero too many or too few, a changed digit, or the
# wrong unit. A crisp rule that a tiny model learns in minutes, and a random one cannot guess.
UNITS = [("km", "m", 3), ("m", "cm", 2), ("kg", "g", 3), ("m", "mm", 3), ("cm", "mm", 1), ("L", "mL", 3)]


def conversion_question(rng: random.Random) -> tuple[str, str]:
    """(question, correct answer)."""
    a, b, zeros = rng.choice(UNITS)
    x = rng.randint(1, 999)
    return f"Convert {x} {a} to {b}.", f"{x} {a} = {x}{'0' * zeros} {b}"


def _wrong_conversion(answer: str, rng: random.Random) -> str:
    x, a, _, value, b = answer.split(" ")
    zeros = len(value) - len(x)
    mistake = rng.choice(["zeros", "digit", "unit"])
    if mistake == "zeros":
        value = x + "0" * (zeros + (1 if zeros == 1 else rng.choice([-1, 1])))
    elif mistake == "digit":
        i = rng.randrange(len(x))
        x_wrong = x[:i] + rng.choice([d for d in "123456789" if d != x[i]]) + x[i + 1:]
        value = x_wrong + "0" * zeros
    else:
        b = a
    return f"{x} {a} = {value} {b}"


def conversion_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs in the prompt/chosen/rejected format, chosen correct."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = conversion_question(rng)
        rows.append({"prompt": [{"role": "user", "content": question}], "chosen": answer,
                     "rejected": _wrong_conversion(answer, rng)})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def build_default(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200) -> Path:
    """Model, tokenizer and train/held-out pairs for example_configs/tiny-cpu.yml (the demo)."""
    out_dir = Path(out_dir)
    rng = random.Random(7)
    corpus = [" ".join(conversion_question(rng)) for _ in range(3000)]
    tokenizer = build_tokenizer(out_dir / "model", single_digits=True, extra_corpus=corpus)
    build_model("demo", out_dir / "model", tokenizer=tokenizer)
    write_jsonl(conversion_pairs(n_train, seed=1), out_dir / "data" / "train.jsonl")
    write_jsonl(conversion_pairs(n_eval, seed=2), out_dir / "data" / "eval.jsonl")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", nargs="?", default="build/tiny")
    args = parser.parse_args(argv)
    out = build_default(args.out_dir)
    print(f"built tiny model and data in {out}")


if __name__ == "__main__":
    main()
