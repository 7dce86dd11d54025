"""Our converter against llama.cpp's own (tests/official.py) on tiny random models around real
tokenizer files: the same tensors, the same tokenizer metadata, the same tokenization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from test_convert import CONVERSATION, CORPUS

import official
import tiny
from serve.convert import convert
from serve.llama import opened

# Keys whose values legitimately differ: {key: why}. README, "Tested against llama.cpp's converter".
EXPECTED_DIFFERENCES = {
    "general.name": "naming: the official converter names the file after its directory",
    "general.size_label": "naming",
    "general.type": "naming",
    # The official converter looks the vocabulary up in its fingerprint table, whose entry for this
    # one is Pixtral's (run with the Llama-3 split); we name the split HF runs (tekken). llama.cpp
    # tokenizes the corpus identically through both files (the test below).
    "tokenizer.ggml.pre": "fingerprint table vs split pattern",
}


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        out[name] = value
    return out, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def reference_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    tiny.build_model("mistral", root / "nemo", tokenizer=tiny.build_tekken_tokenizer(None), initializer_range=0.1)
    return (root / "nemo", convert(root / "nemo", root / "ours.gguf", "f32"),
            official.convert(root / "nemo", root / "official.gguf", "f32"))


def test_tensors_equal_the_official_converters(reference_pair):
    _, ours, theirs = reference_pair
    (_, our_tensors), (_, their_tensors) = _fields(ours), _fields(theirs)
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, tensor in their_tensors.items():
        mine = our_tensors[name]
        assert list(mine.shape) == list(tensor.shape) and mine.tensor_type == tensor.tensor_type, name
        assert np.array_equal(np.asarray(mine.data), np.asarray(tensor.data)), name


def test_metadata_equals_the_official_converters(reference_pair):
    _, ours, theirs = reference_pair
    (mine, _), (reference, _) = _fields(ours), _fields(theirs)
    differ = sorted(k for k in set(mine) | set(reference) if mine.get(k) != reference.get(k))
    assert set(differ) <= set(EXPECTED_DIFFERENCES), {k: (mine.get(k), reference.get(k)) for k in differ
                                                      if k not in EXPECTED_DIFFERENCES}
    assert mine["tokenizer.ggml.pre"] == "tekken"


def test_llama_cpp_tokenizes_identically_through_both_files(reference_pair):
    model_dir, ours, theirs = reference_pair
    from transformers import AutoTokenizer

    texts = CORPUS + [AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(CONVERSATION, tokenize=False)]
    with opened(ours, n_ctx=256, threads=2) as a, opened(theirs, n_ctx=256, threads=2) as b:
        for text in texts:
            for bos in (False, True):
                assert a.tokenize(text.encode(), add_bos=bos, special=True) == \
                    b.tokenize(text.encode(), add_bos=bos, special=True), (text, bos)
