"""A LoRA adapter merged into its base model one tensor slice at a time, in fp32 and never into a
4/8-bit base: the merged model is never held in memory, nor written out as a checkpoint. The
converter reads a `Merged` checkpoint exactly as it reads a plain one.

What PEFT saves and how `merge_and_unload()` applies it (the tests check each against PEFT):
- `lora_A`/`lora_B` on a linear layer: W + s·B·A, s = alpha/r (alpha/√r with rsLoRA; per-module alpha
  from `alpha_pattern`, r from the tensors' shapes);
- `lora_embedding_A`/`_B` on an embedding: W + s·(B·A)ᵀ;
- DoRA (`lora_magnitude_vector`): the merged rows (columns for an embedding) rescaled to the learned
  magnitudes;
- full tensors (`modules_to_save`, and embeddings PEFT saves beside an adapter on them, resized
  vocabularies included) replace the base's;
- tied embeddings with an adapter on one side: the two sides are written separately (untied).
QLoRA adapters are LoRA adapters trained against a 4-bit base; they merge into its full-precision weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from orpo_plugin.core.errors import OrpoError
from serve.export.checkpoint import Checkpoint, CheckpointError, Entry, read_header, read_rows

PREFIX = "base_model.model."
EMBED_SUFFIX = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


class MergeError(OrpoError, ValueError):
    pass


class _Lora:
    """One adapted tensor: where its A, B (and DoRA magnitude) are, and its scale."""

    def __init__(self, base_name: str):
        self.base_name = base_name
        self.a: Entry | None = None
        self.b: Entry | None = None
        self.magnitude: Entry | None = None
        self.embedding = False
        self.scale = 0.0


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern keys: the first key that matches the module
    name's end, on a dot boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class Adapter:
    """adapter_config.json and adapter_model.safetensors as `axolotl train` (PEFT) saves them."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        config_path = self.directory / "adapter_config.json"
        if not config_path.is_file():
            raise MergeError(
                f"{self.directory}: no adapter_config.json; pass the directory `axolotl train` wrote "
                f"(its output_dir), or omit the adapter for a full fine-tune"
            )
        self.config = json.loads(config_path.read_text())
        self._refuse_unsupported(config_path)
        weights = self.directory / "adapter_model.safetensors"
        if not weights.is_file():
            raise MergeError(
                f"{self.directory}: no adapter_model.safetensors (an adapter saved as .bin? re-save it "
                f"with save_pretrained(..., safe_serialization=True))"
            )
        self.loras: dict[str, _Lora] = {}
        self.replacements: dict[str, Entry] = {}
        for key, entry in read_header(weights).items():
            self._add(key, entry, weights)
        for lora in self.loras.values():
            if lora.a is None or lora.b is None:
                raise MergeError(
                    f"{weights}: {lora.base_name} has only half of its LoRA pair (lora_A and lora_B); "
                    f"the adapter file is incomplete"
                )
            r = lora.a.shape[0]
            module = lora.base_name.removesuffix(".weight")
            alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
            lora.scale = alpha / (r**0.5 if self.config.get("use_rslora") else r)

    def _refuse_unsupported(self, config_path: Path) -> None:
        config = self.config
        refusals = [
            (
                config.get("peft_type", "LORA") != "LORA",
                f"peft_type {config.get('peft_type')!r} (only LoRA adapters can be merged)",
            ),
            (config.get("fan_in_fan_out"), "fan_in_fan_out (GPT-2 style Conv1D layers)"),
            (config.get("lora_bias"), "lora_bias (a trained bias on lora_B)"),
        ]
        for refused, what in refusals:
            if refused:
                raise MergeError(
                    f"{config_path}: {what} is not supported by the merge; train a plain LoRA "
                    f"(DoRA and rsLoRA are supported)"
                )

    def _add(self, key: str, entry: Entry, weights: Path) -> None:
        if not key.startswith(PREFIX):
            raise MergeError(f"{weights}: tensor {key} is not under {PREFIX!r}; not a PEFT causal-LM adapter")
        name = key[len(PREFIX) :]
        for suffix, part in (
            (".lora_A.weight", "a"),
            (".lora_B.weight", "b"),
            (".lora_embedding_A", "a"),
            (".lora_embedding_B", "b"),
            (".lora_magnitude_vector.weight", "magnitude"),
            (".lora_magnitude_vector", "magnitude"),
        ):
            if name.endswith(suffix):
                base_name = name[: -len(suffix)] + ".weight"
                lora = self.loras.setdefault(base_name, _Lora(base_name))
                setattr(lora, part, entry)
                lora.embedding |= "embedding" in suffix
                return
        if ".lora_" in name:
            raise MergeError(f"{weights}: tensor {key} is of a LoRA variant the merge does not know")
        # A full tensor: modules_to_save, or the (possibly resized) base of an adapted embedding.
        self.replacements[name.replace(".base_layer.", ".")] = entry

    @property
    def touched(self) -> set[str]:
        return set(self.loras) | set(self.replacements)


class Merged:
    """base + adapter, read like a Checkpoint: names(), shape(), rows(). Rows are merged on demand."""

    def __init__(self, base: Checkpoint, adapter: Adapter):
        self.base, self.adapter = base, adapter
        self.directory = base.directory
        # The tokenizer the adapter was trained with: Axolotl saves it beside the adapter.
        self.tokenizer_dir = (
            adapter.directory if (adapter.directory / "tokenizer_config.json").is_file() else base.directory
        )
        self.config = dict(base.config)
        self._names = base.names()
        embed = next((n for n in self._names if n.endswith(EMBED_SUFFIX)), None)
        self._aliases: dict[str, str] = {}
        text_config = self.config.get("text_config") or self.config
        tied = text_config.get("tie_word_embeddings", self.config.get("tie_word_embeddings", True))
        if LM_HEAD not in self._names and embed and tied:
            self._aliases[LM_HEAD] = embed  # llama.cpp reuses token_embd; PEFT's lm_head reads the same matrix
            if {LM_HEAD, embed} & adapter.touched:
                self._names.append(LM_HEAD)  # the two sides now differ: written separately
                self.config["tie_word_embeddings"] = False
                if "text_config" in self.config:
                    self.config["text_config"] = {**text_config, "tie_word_embeddings": False}
        self._check_fits()
        if embed in adapter.replacements:  # a vocabulary resized in training
            self.config["vocab_size"] = adapter.replacements[embed].shape[0]
        self._current: tuple[str, np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self._column_norms: dict[str, np.ndarray] = {}

    def _base_shape(self, name: str) -> tuple[int, ...] | None:
        source = self._aliases.get(name, name)
        return self.base.shape(source) if source in self.base.entries else None

    def _check_fits(self) -> None:
        declared = self.adapter.config.get("base_model_name_or_path")
        for name in self.adapter.replacements:
            if self._base_shape(name) is None:
                raise MergeError(
                    f"{self.adapter.directory} does not fit base model {self.directory} (the adapter names "
                    f"{declared!r}): it replaces {name}, which the base does not have"
                )
        for name, lora in self.adapter.loras.items():
            shape = self.shape(name) if self._base_shape(name) is not None else None
            rows, cols = (
                (lora.b.shape[0], lora.a.shape[1]) if not lora.embedding else (lora.a.shape[1], lora.b.shape[0])
            )
            if shape is None or shape != (rows, cols):
                what = "does not have it" if shape is None else f"has it as {list(shape)}"
                raise MergeError(
                    f"{self.adapter.directory} does not fit base model {self.directory} (the adapter names "
                    f"{declared!r}): its LoRA on {name} is for a [{rows}, {cols}] matrix, the base "
                    f"{what}"
                )

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.adapter.replacements:
            return self.adapter.replacements[name].shape
        return self.base.shape(self._aliases.get(name, name))

    def _plain_rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        if name in self.adapter.replacements:
            return read_rows(self.adapter.replacements[name], start, stop)
        return self.base.rows(self._aliases.get(name, name), start, stop)

    def _factors(self, lora: _Lora) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A and B in fp32 (B pre-scaled) and the DoRA magnitude, for the tensor being converted."""
        if self._current is None or self._current[0] != lora.base_name:
            magnitude = read_rows(lora.magnitude) if lora.magnitude is not None else None
            self._current = (lora.base_name, read_rows(lora.a), read_rows(lora.b) * np.float32(lora.scale), magnitude)
        return self._current[1:]

    def _delta(self, lora: _Lora, start: int, stop: int) -> np.ndarray:
        a, b, _ = self._factors(lora)
        if lora.embedding:  # (B·A)ᵀ, rows = vocabulary entries
            return (b @ a[:, start:stop]).T
        return b[start:stop] @ a

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        data = self._plain_rows(name, start, stop)
        lora = self.adapter.loras.get(name)
        if lora is None:
            return data
        stop = start + data.shape[0]
        data = data + self._delta(lora, start, stop)
        _, _, magnitude = self._factors(lora)
        if magnitude is None:
            return data
        if lora.embedding:  # DoRA on an embedding normalises columns over the whole vocabulary
            return data * (magnitude / self._column_norm(lora))[None, :]
        return data * (magnitude[start:stop] / np.linalg.norm(data, axis=1))[:, None]

    def _column_norm(self, lora: _Lora) -> np.ndarray:
        name = lora.base_name
        if name not in self._column_norms:
            total, rows, step = 0.0, self.shape(name)[0], 4096
            for start in range(0, rows, step):
                chunk = self._plain_rows(name, start, start + step) + self._delta(lora, start, min(rows, start + step))
                total = total + (chunk.astype(np.float64) ** 2).sum(axis=0)
            self._column_norms[name] = np.sqrt(total).astype(np.float32)
        return self._column_norms[name]


def merged(base: str | Path, adapter: str | Path | None):
    """The checkpoint to export: the base as is, or with the adapter merged in on the fly."""
    try:
        checkpoint = Checkpoint(base)
    except CheckpointError as err:
        raise MergeError(str(err)) from None
    return checkpoint if adapter is None else Merged(checkpoint, Adapter(adapter))
