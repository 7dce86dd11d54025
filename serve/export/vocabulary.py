"""A model's tokenizer as llama.cpp's vocabulary in a GGUF.

The kind is read from what tokenizer.json does, not from its flags:
- byte-level pre-tokenization (a ByteLevel step) is byte-level BPE (llama.cpp's "gpt2" model),
  whatever `byte_fallback` says; the chain of split patterns names llama.cpp's pre-tokenizer;
- BPE over "▁"-joined pieces with byte fallback (a Metaspace step, or a normalizer that replaces
  spaces with "▁") is SentencePiece-style BPE (llama.cpp's "llama" model);
- anything else (Unigram, WordPiece, BPE without merges or of neither kind) is refused in one line
  by check_tokenizer, before any file is written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.tokenize import special_prefix


class ConversionError(OrpoError, ValueError):
    """A model or tokenizer this converter cannot write; the message says what and why."""


# llama.cpp's pre-tokenizer names, identified from the HF pre-tokenizer's chain of split patterns
# rather than from a hash of a sample encoding (which fails for any tokenizer not in llama.cpp's table).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
DIGITS = r"\p{N}"  # tokenizers' Digits(individual_digits=True): every digit a piece of its own
PRE_TOKENIZERS = {
    (GPT2_PATTERN,): "gpt-2",
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501 (the tokenizers' own pattern)
    ): "llama-bpe",
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501 (the tokenizers' own pattern)
    ): "qwen2",
    # Mistral's tekken (Nemo, Small 3 and later)
    (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
        r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",  # noqa: E501 (the tokenizers' own pattern)
    ): "tekken",
    # SmolLM and SmolLM2: digits split one by one, then GPT-2's split
    (DIGITS, GPT2_PATTERN): "smollm",
}


def _split_patterns(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre["pretokenizers"] for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        return [pre["pattern"].get("Regex") or pre["pattern"].get("String")]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return [GPT2_PATTERN]
    if pre.get("type") == "Digits":
        return [DIGITS if pre.get("individual_digits") else r"\p{N}+"]
    return []


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    patterns = tuple(_split_patterns(tokenizer_json.get("pre_tokenizer")))
    if patterns in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[patterns]
    raise ConversionError(
        f"unknown BPE pre-tokenizer (split patterns: {patterns or 'none'}); known: "
        f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
    )


def _token_types(tokenizer, vocab_size: int, normal=lambda token: gguf.TokenType.NORMAL):
    """Tokens by id with llama.cpp's types; ids HF does not use (a padded vocabulary) become UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(normal(token))
    return tokens, types


def _merges(spec: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def _write_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer, spec: dict, vocab_size: int, dirs: list[Path]) -> None:
    tokens, types = _token_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(spec))


_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _adds_space_prefix(spec: dict) -> bool:
    """Whether HF puts "▁" in front of the text (a Prepend normalizer or a Metaspace pre-tokenizer)."""
    steps = [spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}]
    steps = [sub for step in steps for sub in (step.get("normalizers") or step.get("pretokenizers") or [step])]
    return any(
        step.get("type") == "Prepend"
        or (step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never")
        for step in steps
    )


def _write_sentencepiece_bpe(writer: gguf.GGUFWriter, tokenizer, spec: dict, vocab_size: int, dirs: list[Path]) -> None:
    """Llama-2/Mistral-style vocabularies (tokenizer.json's BPE with byte fallback) for llama.cpp's
    SentencePiece tokenizer, which merges the pair whose result scores highest. The scores are the
    SentencePiece model's own where tokenizer.model ships beside tokenizer.json (as llama.cpp's converter
    takes them); otherwise a piece scores minus the rank of the merge that makes it, so merges happen
    in tokenizer.json's order."""
    tokens, types = _token_types(
        tokenizer,
        vocab_size,
        normal=lambda token: gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(token) else gguf.TokenType.NORMAL,
    )
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < vocab_size:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    spm = next((d / "tokenizer.model" for d in dirs if (d / "tokenizer.model").is_file()), None)
    writer.add_token_scores(_sentencepiece_scores(spm, tokens) or _merge_scores(spec, tokens, types))
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _sentencepiece_scores(path: Path | None, tokens: list[str]) -> list[float] | None:
    """tokenizer.model's scores by id, or None without one (or one for another vocabulary)."""
    if path is None:
        return None
    from sentencepiece import SentencePieceProcessor

    model = SentencePieceProcessor(model_file=str(path))
    size = model.get_piece_size()
    if size > len(tokens) or any(model.id_to_piece(i) != tokens[i] for i in range(size)):
        return None
    return [model.get_score(i) for i in range(size)] + [-1000.0] * (len(tokens) - size)


def _merge_scores(spec: dict, tokens: list[str], types: list) -> list[float]:
    score: dict[str, float] = {}
    for rank, merge in enumerate(_merges(spec)):  # pieces hold "▁", never a space
        score.setdefault(merge.replace(" ", ""), -float(rank))
    return [score.get(t, 0.0) if types[i] == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(tokens)]


def _steps(spec: dict, key: str) -> list[dict]:
    """The normalizer's or pre-tokenizer's steps, Sequences flattened."""

    def flat(step):
        if not step:
            return []
        inner = step.get("normalizers") or step.get("pretokenizers")
        return [s for sub in inner for s in flat(sub)] if inner else [step]

    return flat(spec.get(key))


def tokenizer_kind(spec: dict) -> str:
    """ "byte-level" or "sentencepiece" from what tokenizer.json does; ConversionError otherwise."""
    model = spec.get("model") or {}
    kind = model.get("type")
    supported = "byte-level BPE and SentencePiece-style BPE with byte fallback are"
    if kind != "BPE":
        raise ConversionError(
            f"its tokenizer is a {kind} model, which llama.cpp's vocabularies here do not take ({supported})"
        )
    if not model.get("merges"):
        raise ConversionError(
            f"its BPE tokenizer has no merges, so llama.cpp could not tokenize as it does ({supported})"
        )
    if any(step.get("type") == "ByteLevel" for step in _steps(spec, "pre_tokenizer")):
        return "byte-level"
    metaspace = any(step.get("type") == "Metaspace" for step in _steps(spec, "pre_tokenizer")) or any(
        step.get("type") == "Replace" and step.get("content") == "\u2581" for step in _steps(spec, "normalizer")
    )
    if metaspace and model.get("byte_fallback"):
        return "sentencepiece"
    raise ConversionError(
        "its BPE tokenizer is neither byte-level (a ByteLevel pre-tokenizer) nor SentencePiece-style "
        f"(\u2581 for spaces, with byte fallback), so llama.cpp could not tokenize as it does ({supported})"
    )


WRITERS = {"byte-level": _write_byte_level_bpe, "sentencepiece": _write_sentencepiece_bpe}


def _spec(tokenizer) -> dict:
    """The tokenizer HF actually runs: transformers 5 may replace tokenizer.json's pre-tokenizer
    with the model family's own (Qwen2 does), and llama.cpp must reproduce what HF does."""
    return json.loads(tokenizer.backend_tokenizer.to_str())


def check_tokenizer(tokenizer, where: Path) -> None:
    """Refuses, in one line naming the directory, a tokenizer the vocabulary writer cannot map (and,
    for byte-level BPE, a pre-tokenizer llama.cpp does not know); writes nothing."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConversionError(f"{where}: the export needs a tokenizer.json (a fast tokenizer); none loads there")
    spec = _spec(tokenizer)
    try:
        if tokenizer_kind(spec) == "byte-level":
            pre_tokenizer_name(spec)
    except ConversionError as err:
        raise ConversionError(f"{where}: {err}; export with the tokenizer the model was trained with") from None


def write_tokenizer(writer: gguf.GGUFWriter, source, config: dict) -> None:
    """The tokenizer the model was trained with (source.tokenizer_dir; a SentencePiece tokenizer.model
    there or beside the base's weights)."""
    from transformers import AutoTokenizer

    vocab_size = config["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    check_tokenizer(tokenizer, source.tokenizer_dir)
    spec = _spec(tokenizer)
    WRITERS[tokenizer_kind(spec)](writer, tokenizer, spec, vocab_size, [source.tokenizer_dir, source.directory])
    # A tokenizer without a BOS of its own (Qwen2) still has the model's in config.json: without it
    # llama.cpp would take token 11 as BOS. Whether BOS is added is written separately.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.get("bos_token_id")
    for setter, token_id in (
        (writer.add_bos_token_id, bos),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    # Whether BOS and EOS are added: as HF encodes, not as its flags say.
    prefix = special_prefix(tokenizer)
    plain, full = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    writer.add_add_bos_token(bool(prefix))
    writer.add_add_eos_token(len(full) > len(prefix) + len(plain))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
