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
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = {
    "axolotl",
    "torch",
    "bitsandbytes",
    "triton",
    "peft",
    "trl",
    "accelerate",
    "deepspeed",
    "torchao",
    "liger-kernel",
}


def _llama_wheels() -> Path:
    """The llama-cpp-python wheel `make setup` built for this machine (ORPO_LLAMA_WHEELS)."""
    version = re.search(r'"llama-cpp-python[^=]*==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
    found = os.environ.get("ORPO_LLAMA_WHEELS") or next(
        iter(sorted(Path.home().glob(f".cache/orpo-plugin/wheels/llama-cpp-python-{version}-*"))), None
    )
    assert found and list(Path(found).glob("*.whl")), "no llama-cpp-python wheel: run `make setup` first"
    return Path(found)


def _source(tmp_path: Path) -> Path:
    """The project's packaged files, copied: building a wheel writes build/ and *.egg-info beside them."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "orpo_plugin", "serve", "orpo_demo"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(
            ROOT / name,
            src / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if (ROOT / name).is_dir() else {}),
        )
    return src


def _run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_serve_extra_installs_without_axolotl_or_torch(tmp_path, trained_tiny):
    src, venv = _source(tmp_path), tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    pip = [
        venv / "bin" / "python",
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "--quiet",
        "--find-links",
        _llama_wheels(),
    ]
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
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "serve").rglob("*.py")
    )
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "assert 'torch' not in sys.modules and 'axolotl' not in sys.modules\n"
        "import importlib.util as u; assert u.find_spec('torch') is None\n"
    )
    _run(venv / "bin" / "python", "-c", probe, env=env, cwd=tmp_path)

    # The trained adapter exported and scored there: the export's tensor and token checks run, its
    # logits check says why it was left out, and the q8_0 file is byte for byte the full install's.
    from orpo_demo.env import offline_env

    env = offline_env(env)
    out = tmp_path / "gguf"
    _run(
        venv / "bin" / "orpo",
        "merge-and-quantize",
        "--base",
        trained_tiny["base"],
        "--adapter",
        trained_tiny["adapter"],
        "--out",
        out,
        "--quant",
        "q8_0",
        "--quant",
        "f16",
        "--eval-pairs",
        trained_tiny["eval"],
        "--eval-limit",
        "8",
        "--keep-accuracy",
        "0.9",
        env=env,
        cwd=tmp_path,
    )
    report = json.loads((out / "export_report.json").read_text())
    assert report["models"]["q8_0"]["ok"] and report["models"]["q8_0"]["tokens_identical"]
    assert report["logits"] == {
        "checked": False,
        "why": "torch is not installed (orpo-plugin[serve] alone); install torch to run it",
    }
    assert (out / "model-q8_0.gguf").read_bytes() == (trained_tiny["gguf"] / "model-q8_0.gguf").read_bytes()
    # Without torch the merged model is not built: the most precise file stands in for it.
    preference = report["preference"]
    assert preference["reference"] == "model-f16.gguf" and "torch is not installed" in preference["reference_note"]
    assert list(preference["models"]) == ["f16", "q8_0"] and preference["models"]["f16"]["kept"] == 1.0
    assert preference["chosen"] == report["modelfile"]["from"]

    # The GGUF scores there; the adapter, which needs torch, gets one line saying so, no traceback.
    pairs = ["--pairs", trained_tiny["eval"], "--limit", "4"]
    _run(venv / "bin" / "orpo", "score", out / "model-q8_0.gguf", *pairs, env=env, cwd=tmp_path)
    proc = subprocess.run(
        [str(c) for c in (venv / "bin" / "orpo", "score", trained_tiny["adapter"], *pairs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
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
    marker_env = {
        "python_version": "3.12",
        "python_full_version": "3.12.1",
        "sys_platform": "linux",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "extra": "",
    }
    found = []
    for req in requirements:
        name = canonicalize_name(req.name)
        if (
            (not req.marker or req.marker.evaluate(marker_env))
            and name in installed
            and not req.specifier.contains(installed[name], prereleases=True)
        ):
            found.append(f"{req} but {name} {installed[name]} is installed")
    return found


def _compat():
    """scripts/compat.py (`make compat`) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compat", ROOT / "scripts" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_compat_reads_requires_python_from_pypi_and_refuses_an_older_interpreter(tmp_path, monkeypatch, capsys):
    """`make compat` never forces an install past Requires-Python. It reads each release's from
    PyPI's index (recorded in tests/data on 2026-12-06, so the test never touches the network:
    Axolotl 0.21.0 requires >=3.12); given an interpreter older than the release requires, it says
    so in one line, exits 2, and builds nothing."""
    compat = _compat()
    files = json.loads((ROOT / "tests" / "data" / "pypi-axolotl-simple.json").read_text())["files"]
    assert compat.release_from_index(files, "0.21.0") == ("0.21.0", ">=3.12")
    assert compat.release_from_index(files, "0.19.0")[0] == "0.19.0"
    assert Version(compat.release_from_index(files, None)[0]) >= Version("0.21.0")
    with pytest.raises(SystemExit):
        compat.release_from_index(files, "0.0.1")
    assert capsys.readouterr().err.startswith("compat: axolotl 0.0.1 is not on PyPI; releases: ")

    version = ".".join(map(str, sys.version_info[:3]))
    monkeypatch.setattr(compat, "axolotl_release", lambda asked: ("9.0.0", f">{version}"))
    with pytest.raises(SystemExit) as exit_:
        compat.main(["--python", sys.executable, "--out", str(tmp_path / "compat")])
    assert exit_.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"compat: axolotl 9.0.0 requires Python >{version}; {sys.executable} is "
        f"Python {version} (give an interpreter that satisfies it with --python)\n"
    )
    assert not (tmp_path / "compat").exists()
