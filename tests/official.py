"""llama.cpp's own converter, the reference our converter is tested against: convert_hf_to_gguf.py as
vendored in the source archive of the llama-cpp-python we run (so it matches that llama.cpp),
fetched by pip the first time and kept in a cache (never in the repository)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import llama_cpp

from orpo_plugin.core.atomic import atomic_path

VERSION = llama_cpp.__version__
CACHE = Path(os.environ.get("ORPO_REFERENCE_CACHE", Path.home() / ".cache" / "orpo-plugin"))
PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    root = CACHE / f"llama.cpp-converter-{VERSION}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                tmp,
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        [archive] = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar, atomic_path(root, keep_existing=True) as out:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(PARTS) and (m.isfile() or m.isdir())
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            tar.extractall(out, members=members, filter="data")
    return root


def convert(model_dir: Path, out: Path, out_type: str = "f32") -> Path:
    """model_dir -> out with llama.cpp's convert_hf_to_gguf.py."""
    root = converter_dir()
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "convert_hf_to_gguf.py"),
            str(model_dir),
            "--outfile",
            str(out),
            "--outtype",
            out_type,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
