"""HF checkpoint (safetensors + tokenizer.json) -> GGUF, built on the `gguf` package.

Tensors stream from a checkpoint (serve.export.checkpoint, or serve.export.merge's merged view of one) into the
writer in slices of about 2M values; the file is written under a temporary name and renamed at the
end, so a killed run leaves nothing under the final name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from orpo_plugin.core.atomic import atomic_path
from serve.export.architectures import UnsupportedConfig, get_architectures
from serve.export.rope import RopeError, write_rope
from serve.export.vocabulary import ConversionError, write_tokenizer

# Output types written directly (K-quants come from llama.cpp's quantizer on top of these).
OUT_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


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
    write_tokenizer(writer, source, config)
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
