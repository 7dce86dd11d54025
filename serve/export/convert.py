"""HF checkpoint (safetensors + tokenizer.json) -> GGUF, built on the `gguf` package.

Tensors stream from a checkpoint (serve.export.checkpoint, or serve.export.merge's merged view of one) into the
writer in slices of about 2M values; the file is written under a temporary name and renamed at the
end, so a killed run leaves nothing under the final name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from orpo_plugin.core.atomic import atomic_path
from orpo_plugin.core.tokenize import special_prefix
from serve.export.architectures import UnsupportedConfig, get_architectures
from serve.export.rope import RopeError, write_rope

# Output types written directly (K-quants come from llama.cpp's quantizer on top of these).
OUT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

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


class ConversionError(ValueError):
    """A model or tokenizer this converter cannot write; the message says what and why."""


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


def permute_for_llama(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-rotation layout -> llama.cpp interleaved pairs, per head."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32  # norms and biases stay exact
    if wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16  # rows must be whole blocks; llama.cpp falls back likewise
    return wanted


_NUMPY = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


F16_MAX = float(np.finfo(np.float16).max)
CHUNK_ELEMENTS = 1 << 21  # rows are converted in slices of about 8 MiB of float32


@dataclass(frozen=True)
class _Planned:
    hf_name: str  # in the checkpoint, or a tensor computed from the config (in `generated`)
    name: str
    shape: tuple[int, ...]
    kind: gguf.GGMLQuantizationType
    heads: int | None  # permute Q/K rows with this many heads, or not at all

    @property
    def nbytes(self) -> int:
        if self.kind in _NUMPY:
            return int(np.prod(self.shape)) * np.dtype(_NUMPY[self.kind]).itemsize
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.kind)))


def _encode(data: np.ndarray, kind: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F16:
        peak = float(np.abs(data).max(initial=0.0))
        if not peak <= F16_MAX:
            raise F16RangeError(
                f"tensor {name} has values up to {peak:.4g}, beyond f16's range ({F16_MAX:.0f}); "
                f"write bf16 or f32 instead"
            )
    if kind in _NUMPY:
        return data.astype(_NUMPY[kind])
    return gguf.quants.quantize(data, kind)  # bytes, uint8


def _decode(encoded: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    if kind in _NUMPY:
        return encoded.astype(np.float32)
    return gguf.quants.dequantize(encoded, kind)


class F16RangeError(ConversionError):
    """A tensor that f16 cannot hold (the export then takes bf16 for its intermediate)."""


class _Stream:
    """A tensor written slice by slice: gguf's writer calls tofile(f), as it does on an array."""

    def __init__(self, nbytes: int, slices):
        self.nbytes, self._slices = nbytes, slices

    def tofile(self, f) -> None:
        for piece in self._slices():
            piece.tofile(f)


def _row_step(shape: tuple[int, ...], heads: int | None) -> int:
    """Rows per slice: about CHUNK_ELEMENTS values, whole heads where rows are permuted per head."""
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    unit = shape[0] // heads if heads else 1
    return max(unit, CHUNK_ELEMENTS // row // unit * unit)


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


def _vocabulary_writer(spec: dict, where: Path):
    model = spec["model"]
    if model["type"] == "BPE":
        return _write_sentencepiece_bpe if model.get("byte_fallback") else _write_byte_level_bpe
    raise ConversionError(
        f"{where}: tokenizer model {model['type']!r} is not supported (byte-level BPE and "
        f"SentencePiece-style BPE with byte fallback are)"
    )


def _write_tokenizer(writer: gguf.GGUFWriter, source, config: dict) -> None:
    """The tokenizer the model was trained with (source.tokenizer_dir; a SentencePiece tokenizer.model
    there or beside the base's weights)."""
    from transformers import AutoTokenizer

    vocab_size = config["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    # The tokenizer HF actually runs: transformers 5 may replace tokenizer.json's pre-tokenizer
    # with the model family's own (Qwen2 does), and llama.cpp must reproduce what HF does.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _vocabulary_writer(spec, source.tokenizer_dir)(
        writer, tokenizer, spec, vocab_size, [source.tokenizer_dir, source.directory]
    )
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


def convert(
    source,
    out_path: str | Path,
    out_type: str = "f16",
    *,
    permute_qk: bool | None = None,
    progress: bool = False,
    errors: dict | None = None,
) -> Path:
    """Write a model as a GGUF of out_type (f32, f16, bf16, q8_0). `source` is a model directory or a
    checkpoint object (serve.export.checkpoint.Checkpoint, serve.export.merge.Merged). permute_qk overrides the
    architecture's table entry (tests use it to show that skipping the permute is caught). `errors`,
    if given, receives per tensor {gguf name: [squared error of the written values, squared values]}."""
    if not hasattr(source, "rows"):
        from serve.export.checkpoint import Checkpoint, CheckpointError

        try:
            source = Checkpoint(source)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
    out_path = Path(out_path)
    config = source.config
    arch_name = (config.get("architectures") or ["?"])[0]
    architectures = get_architectures()
    if arch_name not in architectures:
        raise ConversionError(
            f"{source.directory}: architecture {arch_name} is not supported; supported: "
            f"{', '.join(architectures)}. Add one with the register_architectures hook "
            f"(serve/export/architectures.py shows how)"
        )
    if out_type not in OUT_TYPES:
        raise ConversionError(f"unknown output type {out_type!r}; choose from {', '.join(OUT_TYPES)}")
    with atomic_path(out_path) as tmp:
        _write(tmp, architectures[arch_name], source, out_type, permute_qk, progress, errors)
    return out_path


def _write_metadata(writer: gguf.GGUFWriter, arch, source, file_type) -> dict[str, np.ndarray]:
    """Hyperparameters, RoPE and tokenizer; returns the tensors computed from the config."""
    config = source.config
    n_heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_heads
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    # Always, as llama.cpp's converter does: where head_dim is not hidden / heads (Mistral-Nemo, Qwen3),
    # llama.cpp's own default is wrong and it refuses the file.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    try:
        generated = write_rope(writer, config, head_dim, source.directory)
    except RopeError as err:
        raise ConversionError(str(err)) from None
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch.add_metadata:
        try:
            arch.add_metadata(writer, config)
        except UnsupportedConfig as err:
            raise ConversionError(f"{source.directory / 'config.json'}: {err}") from None
    _write_tokenizer(writer, source, config)
    return generated


def _plan(arch, source, tensor_type, permute_qk: bool | None, generated: dict) -> list[_Planned]:
    """Names, types and shapes from the shapes alone, before any data is read."""
    config = source.config
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    names = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    permute = arch.permute_qk if permute_qk is None else permute_qk
    plan = []
    for hf_name in source.names():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"{source.directory}: no GGUF name for tensor {hf_name}")
        shape = tuple(source.shape(hf_name))
        heads = None
        if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_heads
        elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        plan.append(_Planned(hf_name, name, shape, _tensor_type(name, shape, tensor_type), heads))
    # computed from the config (Llama 3's RoPE factors): kept exact
    plan += [_Planned(name, name, data.shape, gguf.GGMLQuantizationType.F32, None) for name, data in generated.items()]
    return plan


def _write(tmp: Path, arch, source, out_type: str, permute_qk: bool | None, progress: bool, errors: dict | None):
    tensor_type, file_type = OUT_TYPES[out_type]
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    generated = _write_metadata(writer, arch, source, file_type)
    plan = _plan(arch, source, tensor_type, permute_qk, generated)
    for item in plan:
        if item.kind in _NUMPY:
            writer.add_tensor_info(item.name, item.shape, np.dtype(_NUMPY[item.kind]), item.nbytes)
        else:
            writer.add_tensor_info(
                item.name,
                gguf.quant_shape_to_byte_shape(item.shape, item.kind),
                np.dtype(np.uint8),
                item.nbytes,
                raw_dtype=item.kind,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with tqdm(
        total=sum(i.nbytes for i in plan), desc=f"convert {out_type}", unit="B", unit_scale=True, disable=not progress
    ) as bar:
        for item in plan:
            writer.write_tensor_data(
                _Stream(item.nbytes, lambda item=item: _slices(item, arch, source, generated, errors, bar))
            )
    writer.close()


def _slices(item: _Planned, arch, source, generated: dict, errors: dict | None, bar):
    """The tensor's encoded bytes, slice by slice (whole heads where Q/K rows are permuted)."""
    if item.hf_name in generated:
        yield generated[item.hf_name]
        bar.update(item.nbytes)
        return
    rows = item.shape[0] if item.shape else 1
    step = _row_step(item.shape, item.heads)
    for start in range(0, rows, step):
        data = source.rows(item.hf_name, start, start + step)
        if item.heads:
            data = permute_for_llama(data, data.shape[0] // (item.shape[0] // item.heads))
        if arch.transform:
            data = arch.transform(item.name, data)
        encoded = _encode(data, item.kind, item.name)
        if errors is not None:
            total = errors.setdefault(item.name, [0.0, 0.0])
            diff = (_decode(encoded, item.kind) - data).ravel()
            total[0] += float(np.dot(diff, diff))
            total[1] += float(np.dot(data.ravel(), data.ravel()))
        yield encoded
        bar.update(encoded.nbytes)
