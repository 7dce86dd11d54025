"""`pip install 'orpo-plugin[serve]'`: what someone who only serves, chats with, scores or exports a
model installs. Checked in a fresh virtual environment: pip's own resolution report (no Axolotl,
torch, bitsandbytes or CUDA packages), then a real install whose `orpo` command starts and whose
modules all import without torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = {"axolotl", "torch", "bitsandbytes", "triton", "peft", "trl", "accelerate", "deepspeed",
                 "torchao", "liger-kernel"}


def _llama_wheels() -> Path:
    """The llama-cpp-python wheel `make setup` built for this machine (ORPO_LLAMA_WHEELS)."""
    version = re.search(r'"llama-cpp-python[^=]*==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    found = os.environ.get("ORPO_LLAMA_WHEELS") or next(
        iter(sorted(Path.home().glob(f".cache/orpo-plugin/wheels/llama-cpp-python-{version}-*"))), None)
    assert found and list(Path(found).glob("*.whl")), "no llama-cpp-python wheel: run `make setup` first"
    return Path(found)


def _source(tmp_path: Path) -> Path:
    """The project's packaged files, copied: building a wheel writes build/ and *.egg-info beside them."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "orpo_plugin", "serve", "orpo_demo"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (ROOT / name).is_dir() else {}))
    return src


def _run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_serve_extra_installs_without_axolotl_or_torch(tmp_path, trained_tiny):
    src, venv = _source(tmp_path), tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "install", "--quiet",
           "--find-links", _llama_wheels()]
    report = tmp_path / "report.json"
    _run(*pip, "--dry-run", "--report", report, f"{src}[serve]")
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert not names & TRAINING_ONLY, sorted(names & TRAINING_ONLY)
    assert not [n for n in names if n.startswith(("nvidia-", "cuda-"))]
    assert {"llama-cpp-python", "gguf", "transformers", "fastapi", "uvicorn"} <= names

    _run(*pip, f"{src}[serve]")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_text = _run(venv / "bin" / "orpo", "serve", "--help", env=env, cwd=tmp_path).stdout
    assert "--model" in help_text or "MODEL" in help_text
    # Every module of the serve side imports in that environment (torch is not there to import).
    modules = sorted(f"serve.{p.stem}" for p in (ROOT / "serve").glob("*.py") if p.stem != "__init__")
    probe = ("import importlib, sys\n"
             f"for name in {modules!r}: importlib.import_module(name)\n"
             "assert 'torch' not in sys.modules and 'axolotl' not in sys.modules\n"
             "import importlib.util as u; assert u.find_spec('torch') is None\n")
    _run(venv / "bin" / "python", "-c", probe, env=env, cwd=tmp_path)

    # The trained adapter exported and scored there: the export's tensor and token checks run, its
    # logits check says why it was left out, and the q8_0 file is byte for byte the full install's.
    from orpo_demo.env import offline_env

    env = offline_env(env)
    out = tmp_path / "gguf"
    _run(venv / "bin" / "orpo", "merge-and-quantize", "--base", trained_tiny["base"], "--adapter",
         trained_tiny["adapter"], "--out", out, "--quant", "q8_0", env=env, cwd=tmp_path)
    report = json.loads((out / "export_report.json").read_text())
    assert report["models"]["q8_0"]["ok"] and report["models"]["q8_0"]["tokens_identical"]
    assert report["logits"] == {"checked": False, "why": "torch is not installed (orpo-plugin[serve] alone); "
                                                         "install torch to run it"}
    assert (out / "model-q8_0.gguf").read_bytes() == (trained_tiny["gguf"] / "model-q8_0.gguf").read_bytes()

    # The GGUF scores there; the adapter, which needs torch, gets one line saying so, no traceback.
    pairs = ["--pairs", trained_tiny["eval"], "--limit", "4"]
    _run(venv / "bin" / "orpo", "score", out / "model-q8_0.gguf", *pairs, env=env, cwd=tmp_path)
    proc = subprocess.run([str(c) for c in (venv / "bin" / "orpo", "score", trained_tiny["adapter"], *pairs)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "needs torch and peft, which the serve-only install leaves out" in proc.stderr


def _requirements(extras: set[str]) -> list[Requirement]:
    """pyproject.toml's dependencies with these extras, self-references (orpo-plugin[train,serve]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found, todo, seen = list(map(Requirement, project["dependencies"])), list(extras), set()
    while todo:
        extra = todo.pop()
        if extra not in seen:
            seen.add(extra)
            for req in map(Requirement, project["optional-dependencies"][extra]):
                if req.name == project["name"]:
                    todo += req.extras
                else:
                    found.append(req)
    return found


@pytest.mark.parametrize("extras", [{"train"}, {"train", "serve"}])
def test_install_into_a_recorded_axolotl_0_21_environment_changes_nothing(extras):
    """The README's command for an existing Axolotl environment, against the one `make compat` recorded
    (Axolotl 0.21.0, Python 3.12, torch as pip chose it): every requirement that names an installed
    package admits the installed version, so pip (which upgrades only what a requirement needs)
    changes nothing there. `make compat` also runs pip's own --dry-run in that environment."""
    recorded = json.loads((ROOT / "tests" / "data" / "axolotl-0.21.0-py3.12.json").read_text())
    assert recorded["axolotl"] == "0.21.0"
    assert not _conflicts(_requirements(extras), recorded), _conflicts(_requirements(extras), recorded)
    # What it catches: the pins this project had before.
    assert len(_conflicts([Requirement("axolotl==0.19.0"), Requirement("torch<2.14")], recorded)) == 2


def _conflicts(requirements: list[Requirement], installed: dict[str, str]) -> list[str]:
    """The requirements (for Python 3.12 on x86-64 Linux) that an installed version does not satisfy."""
    marker_env = {"python_version": "3.12", "python_full_version": "3.12.1", "sys_platform": "linux",
                  "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
                  "implementation_name": "cpython", "extra": ""}
    found = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if (not req.marker or req.marker.evaluate(marker_env)) and name in installed \
                and not req.specifier.contains(installed[name], prereleases=True):
            found.append(f"{req} but {name} {installed[name]} is installed")
    return found


def test_make_compat_refuses_an_interpreter_older_than_axolotl_requires(tmp_path):
    """`make compat` never forces an install past Requires-Python: on this Python 3.11, Axolotl 0.21
    (which requires 3.12, read from PyPI's index) is refused in one line, and nothing is built."""
    if sys.version_info >= (3, 12):
        pytest.skip("the project's environment is Python 3.11 (make setup); this one already satisfies 0.21")
    proc = subprocess.run([sys.executable, ROOT / "scripts" / "compat.py", "--axolotl", "0.21.0", "--python",
                           sys.executable, "--out", tmp_path / "compat"], capture_output=True, text=True, timeout=300)
    version = ".".join(map(str, sys.version_info[:3]))
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == (f"compat: axolotl 0.21.0 requires Python >=3.12; {sys.executable} is Python {version} "
                           f"(give an interpreter that satisfies it with --python)\n")
    assert not (tmp_path / "compat").exists()
