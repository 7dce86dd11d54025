"""The demo's model and data, built locally: a byte-level BPE tokenizer trained with `tokenizers`,
a small random Llama, and unit-conversion preference pairs. Nothing is downloaded; fixed seeds
make every build the same bytes. The tests build their fixtures on these functions too.

    python -m orpo_demo.build build/tiny      # writes build/tiny/{model,data}
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from orpo_plugin.core.atomic import write_text

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


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
SINGLE_DIGIT_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    seed: int = 0,
    bos_token: str | None = None,
    single_digits: bool = False,
    extra_corpus: list[str] = (),
):
    """Train a byte-level BPE tokenizer with ChatML specials; EOS is the end-of-turn token.
    bos_token (e.g. "<|endoftext|>") makes a Llama-style tokenizer that starts prompts with it;
    single_digits splits numbers into digits (GPT-2's pattern keeps digit runs together)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if single_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SINGLE_DIGIT_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
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
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
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


# fmt: off
DEMO_MODEL = dict(cls="LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  # A wider init than HF's 0.02: LoRA cannot train the LM head or the final norm, and at
                  # 0.02 the logits stay too small for the trained model to be confident.
                  initializer_range=0.1)
# fmt: on


def build_model(spec: dict, out_dir: str | Path | None, tokenizer=None, seed: int = 0):
    """A random-init model of spec (a transformers class name under "cls", then config keys),
    saved with its tokenizer to out_dir. Widths should be multiples of 32 so that GGUF block
    quantization applies."""
    import torch
    import transformers

    spec = dict(spec)
    cls = getattr(transformers, spec.pop("cls"))
    tokenizer = tokenizer or build_tokenizer(None)
    spec.setdefault("vocab_size", len(tokenizer))
    config = cls.config_class(
        **{
            "max_position_embeddings": 2048,
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "torch_dtype": "float32",
            **spec,
        }
    )
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if out_dir is not None:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return model


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
        x_wrong = x[:i] + rng.choice([d for d in "123456789" if d != x[i]]) + x[i + 1 :]
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
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": answer,
                "rejected": _wrong_conversion(answer, rng),
            }
        )
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def build_default(out_dir: str | Path, n_train: int = 2000, n_eval: int = 200) -> Path:
    """Model, tokenizer and train/held-out pairs for example_configs/tiny-cpu.yml (the demo)."""
    out_dir = Path(out_dir)
    rng = random.Random(7)
    corpus = [" ".join(conversion_question(rng)) for _ in range(3000)]
    tokenizer = build_tokenizer(out_dir / "model", single_digits=True, extra_corpus=corpus)
    build_model(DEMO_MODEL, out_dir / "model", tokenizer=tokenizer)
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
