"""Safetensors checkpoints read tensor by tensor and row range by row range, with plain file reads
(no torch, no mmap): a converter that streams an 8B model holds one slice of one tensor at a time,
and pages read earlier are not kept in this process's memory.

A checkpoint is one `model.safetensors` or the shards its `model.safetensors.index.json` names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orpo_plugin.core.errors import OrpoError

# safetensors dtype -> (numpy dtype as stored, bytes per element); BF16 is read as uint16 and widened.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
INDEX = "model.safetensors.index.json"


class CheckpointError(OrpoError, ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file

    @property
    def row_elements(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1


def read_header(path: Path) -> dict[str, Entry]:
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return {
        name: Entry(path, info["dtype"], tuple(info["shape"]), 8 + size + info["data_offsets"][0])
        for name, info in header.items()
    }


def read_rows(entry: Entry, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of a tensor (the whole of a 1-D one) as float32."""
    if entry.dtype not in DTYPES:
        raise CheckpointError(
            f"{entry.path.name}: tensor dtype {entry.dtype} is not supported (F32, F16, BF16 and F64 are)"
        )
    stored = np.dtype(DTYPES[entry.dtype])
    rows = entry.shape[0] if entry.shape else 1
    stop = rows if stop is None else min(stop, rows)
    count = (stop - start) * entry.row_elements
    raw = np.fromfile(
        entry.path, dtype=stored, count=count, offset=entry.offset + start * entry.row_elements * stored.itemsize
    )
    if raw.size != count:
        raise CheckpointError(
            f"{entry.path}: truncated (a tensor ends past the end of the file); download the checkpoint again"
        )
    raw = raw.reshape((stop - start, *entry.shape[1:]) if entry.shape else ())
    if entry.dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw if raw.dtype == np.float32 else raw.astype(np.float32)


class Checkpoint:
    """A model directory's tensors: names, shapes, and rows on demand."""

    def __init__(self, directory: str | Path):
        self.directory = self.tokenizer_dir = Path(directory)
        self.entries = {}
        for shard in self._shards():
            self.entries.update(read_header(shard))
        try:
            self.config = json.loads((self.directory / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{self.directory / 'config.json'}: not readable ({err}); a model directory "
                f"has the config.json its checkpoint came with"
            ) from None
        quantized = (self.config.get("quantization_config") or {}).get("quant_method")
        if quantized:
            raise CheckpointError(
                f"{self.directory} is a {quantized}-quantized checkpoint; export from the "
                f"full-precision model it was made from (a QLoRA adapter merges into that base "
                f"too)"
            )

    def _shards(self) -> list[Path]:
        index = self.directory / INDEX
        if index.is_file():
            names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            missing = [n for n in names if not (self.directory / n).is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} names shards that are not there: {', '.join(missing)}; download the checkpoint again"
                )
            return [self.directory / n for n in names]
        shards = sorted(p for p in self.directory.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if not shards:
            found = sorted(p.name for p in self.directory.glob("*.bin"))
            hint = (
                f" (it has {', '.join(found)}: re-save it with save_pretrained(..., safe_serialization=True))"
                if found
                else ""
            )
            raise CheckpointError(f"{self.directory}: no safetensors weights{hint}")
        return shards

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return read_rows(self.entries[name], start, stop)


def parameters(source) -> int:
    """Number of values in a checkpoint (plain or merged)."""
    return sum(int(np.prod(source.shape(name), dtype=np.int64)) for name in source.names())


def model_directory(base: str | Path) -> Path:
    """A local directory as is; otherwise a hub id, from the local cache or downloaded (weights,
    config and tokenizer files only)."""
    path = Path(base)
    if path.is_dir():
        return path
    if path.exists() or str(base).count("/") != 1:
        raise CheckpointError(f"{base}: not a model directory (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(str(base), allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
        )
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as err:
        raise CheckpointError(
            f"{base}: not a local directory, and the hub copy could not be had ({str(err).splitlines()[0]})"
        ) from None
