"""The vocabulary's kind comes from what tokenizer.json does (serve/export/vocabulary.py), tried on
the tokenizers transformers' own GGUF loader makes, which real users end up with: for SmolLM2-135M
(byte-level BPE, with byte_fallback switched on and a mixed decoder) and for Gemma 3 270M (a
Unigram model, which transformers saves and loads again as a BPE without merges that splits words
into characters). Each time our GGUF tokenizes as HF
does, or the export refuses before writing."""

from __future__ import annotations

import json

import pytest
import real_models
import real_tokenizers
import tiny
from test_reference import varied_corpus
from transformers import AutoTokenizer

from orpo_demo.real_model import packaged_gguf
from serve.export.convert import ConversionError, convert
from serve.export.vocabulary import check_tokenizer, tokenizer_kind
from serve.llama import vocabulary


def _spec(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def test_smollm2_tokenizer_from_transformers_gguf_loader_exports_as_byte_level_and_tokenizes_as_hf(tmp_path):
    gguf_path = packaged_gguf()
    loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    spec = _spec(loaded)
    assert spec["model"]["byte_fallback"] is True  # the flag that used to pick SentencePiece
    assert tokenizer_kind(spec) == "byte-level"
    model = tmp_path / "model"
    tiny.build_model("llama-tied", model, tokenizer=loaded, vocab_size=len(loaded))
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    out = convert(model, tmp_path / "model.gguf", "f32")
    texts = varied_corpus(tokenizer)
    with vocabulary(out) as tokenize:
        for text in texts:
            assert tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text


@pytest.fixture(scope="module")
def gemma3_from_gguf_loader(tmp_path_factory):
    """Gemma 3 270M's checkpoint with the tokenizer transformers' GGUF loader writes for its GGUF."""
    gguf_path = real_models.gemma3_gguf()
    loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    directory = tmp_path_factory.mktemp("gemma3-gguf-tokenizer")
    for item in real_models.gemma3().iterdir():
        if not item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (directory / item.name).symlink_to(item)
    loaded.save_pretrained(str(directory))
    return directory, loaded


def test_gemma3_tokenizer_from_transformers_gguf_loader_is_refused_before_anything_is_written(gemma3_from_gguf_loader):
    from serve.export.pipeline import export

    directory, loaded = gemma3_from_gguf_loader
    assert _spec(loaded)["model"]["type"] == "Unigram"
    with pytest.raises(ConversionError, match=r"gemma3-gguf-tokenizer.*Unigram"):
        check_tokenizer(loaded, directory)
    # Saved and loaded again, as the export loads it, transformers makes it a BPE without merges
    # (Gemma's tokenizer class), which splits words into characters.
    saved = AutoTokenizer.from_pretrained(str(directory))
    assert _spec(saved)["model"]["type"] == "BPE" and not _spec(saved)["model"]["merges"]
    word = "information"
    assert len(saved.tokenize(word)) > len(real_tokenizers.load("gemma3").tokenize(word))
    out = directory.parent / "out"
    with pytest.raises(ConversionError, match=r"gemma3-gguf-tokenizer.*no merges"):
        export(directory, None, out, ["f16"], progress=lambda m: None)
    assert not out.exists() or list(out.iterdir()) == []


def test_kinds_from_behaviour_not_flags(tokenizer, tmp_path):
    """The fixtures' byte-level BPE and SentencePiece-style BPE; a WordPiece model and a BPE without
    merges are refused with the reason."""
    from tokenizers import Tokenizer, models

    assert tokenizer_kind(_spec(tokenizer)) == "byte-level"
    assert tokenizer_kind(_spec(tiny.build_spm_tokenizer(None))) == "sentencepiece"
    byte_level = _spec(tokenizer)
    byte_level["model"]["byte_fallback"] = True
    assert tokenizer_kind(byte_level) == "byte-level"
    wordpiece = json.loads(Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).to_str())
    with pytest.raises(ConversionError, match="WordPiece"):
        tokenizer_kind(wordpiece)
    no_merges = dict(byte_level, model=dict(byte_level["model"], merges=[]))
    with pytest.raises(ConversionError, match="no merges"):
        tokenizer_kind(no_merges)
    plain = dict(_spec(tiny.build_spm_tokenizer(None)), normalizer=None, pre_tokenizer=None)
    with pytest.raises(ConversionError, match="neither byte-level"):
        tokenizer_kind(plain)
