"""HF checkpoint (safetensors + tokenizer.json) -> GGUF, built on the `gguf` package.

Tensors stream from safetensors one at a time into the writer; the file is written under a
temporary name and renamed at the end, so a killed run leaves nothing under the final name.
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
from serve.architectures import UnsupportedConfig, get_architectures
from serve.rope import RopeError, write_rope

# Output types written directly (K-quants come from llama.cpp's quantizer on top of these).
OUT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp's pre-tokenizer names, identified from the HF pre-tokenizer's split pattern rather
# than from a hash of a sample encoding (which fails for any tokenizer not in llama.cpp's table).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT2_PATTERN: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    # Mistral's tekken (Nemo, Small 3 and later)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "tekken",
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
    return []


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    patterns = _split_patterns(tokenizer_json.get("pre_tokenizer"))
    for pattern in patterns:
        if pattern in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[pattern]
    raise ConversionError(f"unknown BPE pre-tokenizer (split patterns: {patterns or 'none'}); known: "
                          f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}")


def permute_for_llama(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF half-rotation layout -> llama.cpp interleaved pairs, per head."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor_type(name: str, shape: tuple[int, ...], wanted: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32  # norms and biases stay exact
    if wanted == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16  # rows must be whole blocks; llama.cpp falls back likewise
    return wanted


_NUMPY = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}


@dataclass(frozen=True)
class _Planned:
    shard: Path | None  # None: a tensor computed from the config
    hf_name: str
    name: str
    kind: gguf.GGMLQuantizationType
    heads: int | None  # permute Q/K rows with this many heads, or not at all


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_tensor(path: Path, info: dict, data_start: int) -> np.ndarray:
    """One tensor as float32 with plain reads: no mmap, so pages read earlier are not held in
    this process's memory while the rest of the file streams through."""
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise ConversionError(f"{path.name}: tensor dtype {info['dtype']} is not supported")
    begin, end = info["data_offsets"]
    raw = np.fromfile(path, dtype=_SAFETENSORS_DTYPES[info["dtype"]], count=(end - begin) // np.dtype(
        _SAFETENSORS_DTYPES[info["dtype"]]).itemsize, offset=data_start + begin).reshape(info["shape"])
    if info["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw if raw.dtype == np.float32 else raw.astype(np.float32)


def _encode(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    if kind in _NUMPY:
        return data.astype(_NUMPY[kind])
    return gguf.quants.quantize(data, kind)  # bytes, uint8


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


def _write_byte_level_bpe(writer: gguf.GGUFWriter, tokenizer, spec: dict, vocab_size: int, model_dir: Path) -> None:
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
    return any(step.get("type") == "Prepend" or (step.get("type") == "Metaspace"
                                                   and step.get("prepend_scheme", "always") != "never")
               for step in steps)


def _write_sentencepiece_bpe(writer: gguf.GGUFWriter, tokenizer, spec: dict, vocab_size: int,
                             model_dir: Path) -> None:
    """Llama-2/Mistral-style vocabularies (tokenizer.json's BPE with byte fallback) for llama.cpp's
    SentencePiece tokenizer, which merges the pair whose result scores highest. The scores are the
    SentencePiece model's own where tokenizer.model ships beside tokenizer.json (as llama.cpp's converter
    takes them); otherwise a piece scores minus the rank of the merge that makes it, so merges happen
    in tokenizer.json's order."""
    tokens, types = _token_types(tokenizer, vocab_size, normal=lambda token: gguf.TokenType.BYTE
                                 if _BYTE_TOKEN.fullmatch(token) else gguf.TokenType.NORMAL)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < vocab_size:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(_sentencepiece_scores(model_dir / "tokenizer.model", tokens)
                            or _merge_scores(spec, tokens, types))
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _sentencepiece_scores(path: Path, tokens: list[str]) -> list[float] | None:
    """tokenizer.model's scores by id, or None without one (or one for another vocabulary)."""
    if not path.is_file():
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
    raise ConversionError(f"{where}: tokenizer model {model['type']!r} is not supported (byte-level BPE and "
                          f"SentencePiece-style BPE with byte fallback are)")


def _write_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    from transformers import AutoTokenizer

    vocab_size = config["vocab_size"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    # The tokenizer HF actually runs: transformers 5 may replace tokenizer.json's pre-tokenizer
    # with the model family's own (Qwen2 does), and llama.cpp must reproduce what HF does.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _vocabulary_writer(spec, model_dir)(writer, tokenizer, spec, vocab_size, model_dir)
    # A tokenizer without a BOS of its own (Qwen2) still has the model's in config.json: without it
    # llama.cpp would take token 11 as BOS. Whether BOS is added is written separately.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.get("bos_token_id")
    for setter, token_id in ((writer.add_bos_token_id, bos),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(token_id)
    # Whether BOS and EOS are added: as HF encodes, not as its flags say.
    prefix = special_prefix(tokenizer)
    plain, full = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (False, True))
    writer.add_add_bos_token(bool(prefix))
    writer.add_add_eos_token(len(full) > len(prefix) + len(plain))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def convert(model_dir: str | Path, out_path: str | Path, out_type: str = "f16", *, permute_qk: bool | None = None,
            progress: bool = False) -> Path:
    """Write model_dir as a GGUF of out_type (f32, f16, bf16, q8_0). permute_qk overrides the
    architecture's table entry (tests use it to show that skipping the permute is caught)."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    arch_name = (config.get("architectures") or ["?"])[0]
    architectures = get_architectures()
    if arch_name not in architectures:
        raise ConversionError(f"{model_dir}: architecture {arch_name} is not supported; supported: "
                              f"{', '.join(architectures)}. Add one with the register_architectures hook "
                              f"(serve/architectures.py shows how)")
    if out_type not in OUT_TYPES:
        raise ConversionError(f"unknown output type {out_type!r}; choose from {', '.join(OUT_TYPES)}")
    with atomic_path(out_path) as tmp:
        _write(tmp, architectures[arch_name], config, model_dir, out_type, permute_qk, progress)
    return out_path


def _write(tmp: Path, arch, config: dict, model_dir: Path, out_type: str, permute_qk: bool | None, progress: bool):
    tensor_type, file_type = OUT_TYPES[out_type]
    n_layers, n_heads = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_heads
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_heads
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    # Always, as llama.cpp's converter does: where head_dim is not hidden / heads (Mistral-Nemo, Qwen3),
    # llama.cpp's own default is wrong and it refuses the file.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    try:
        generated = write_rope(writer, config, head_dim, model_dir)
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
            raise ConversionError(f"{model_dir / 'config.json'}: {err}") from None
    _write_tokenizer(writer, model_dir, config)

    # Pass 1: names, types and sizes from the shapes alone; pass 2 converts and writes one
    # tensor at a time, so no more than one tensor is ever held in memory.
    names = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    permute = arch.permute_qk if permute_qk is None else permute_qk
    plan, headers = [], {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        headers[shard] = _safetensors_header(shard)
        for hf_name, info in headers[shard][0].items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConversionError(f"{shard.name}: no GGUF name for tensor {hf_name}")
            shape = tuple(info["shape"])
            kind = _tensor_type(name, shape, tensor_type)
            heads = None
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = n_heads
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = n_kv
            plan.append(_Planned(shard, hf_name, name, kind, heads))
            if kind in _NUMPY:
                writer.add_tensor_info(name, shape, np.dtype(_NUMPY[kind]),
                                       int(np.prod(shape)) * np.dtype(_NUMPY[kind]).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, kind)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=kind)
    for name, data in generated.items():  # computed from the config (Llama 3's RoPE factors): kept exact
        plan.append(_Planned(None, name, name, gguf.GGMLQuantizationType.F32, None))
        writer.add_tensor_info(name, data.shape, np.dtype(np.float32), data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in tqdm(plan, desc=f"convert {out_type}", unit="tensor", disable=not progress):
        if item.shard is None:
            writer.write_tensor_data(generated[item.name])
            continue
        header, data_start = headers[item.shard]
        data = _read_tensor(item.shard, header[item.hf_name], data_start)
        if item.heads:
            data = permute_for_llama(data, item.heads)
        if arch.transform:
            data = arch.transform(item.name, data)
        writer.write_tensor_data(_encode(data, item.kind))
        del data
    writer.close()
