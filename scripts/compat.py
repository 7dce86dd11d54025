"""`make compat`: the plugin against the newest Axolotl release the registry serves, in a side environment.

    python scripts/compat.py [--axolotl VERSION] [--python PATH] [--out DIR]

1. Asks PyPI for the newest Axolotl release and the Python it requires, and takes an interpreter that
   satisfies it: --python (or $COMPAT_PYTHON) if given, else the oldest such python3.X on PATH or
   under pyenv (Axolotl's pins lag the newest Python: 0.21 pins zstandard 0.22.0, which has no wheel
   for 3.13 and whose source does not build there). One that is too old is refused in one line
   (exit 2); nothing is forced past Requires-Python.
2. Builds build/compat/axolotl-<version>-py<X.Y>/ with that Axolotl alone (torch as Axolotl and pip
   choose) and records what is installed there (freeze.json).
3. Asks pip, with --dry-run --report, what `pip install '.[train]'` would do to that environment: it
   must install the plugin and change no installed package (the command the README gives for an
   existing Axolotl environment).
4. Installs the plugin and the test tools, runs the training-side tests and a short `axolotl train` of
   the embedded model.

Prints one line per step and a summary; exits non-zero when any step fails.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# The tests that need only the training side ([train]): the serve side's tests need llama-cpp-python,
# which compiles for each interpreter (about 15 CPU-minutes) and is not what this checks. gguf (pure
# Python) is added because test_hooks checks that serve's architectures register through the same hooks.
TRAIN_TESTS = [
    "test_odds.py",
    "test_pairs.py",
    "test_boundary.py",
    "test_chat_template.py",
    "test_datasets.py",
    "test_logprobs.py",
    "test_plugin.py",
    "test_hooks.py",
    "test_trainer.py",
    "test_cli.py",
]
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100", "pytest-timeout>=2.3"]


def fail(message: str) -> None:
    print(f"compat: {message}", file=sys.stderr)
    raise SystemExit(2)


def pypi_files() -> list[dict]:
    """Axolotl's files on PyPI's simple index (the JSON form pip itself reads)."""
    request = urllib.request.Request(
        "https://pypi.org/simple/axolotl/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["files"]
    except OSError as err:
        fail(f"cannot read Axolotl's releases from PyPI ({err})")


def release_from_index(files: list[dict], version: str | None) -> tuple[str, str]:
    """(version, Requires-Python) of this Axolotl release, or of the newest final one, among the
    index's files."""
    releases = {}
    for item in files:
        match = re.match(r"axolotl-([^-]+?)(?:-py3-none-any\.whl|\.tar\.gz)$", item["filename"])
        if match and not item.get("yanked"):
            releases.setdefault(Version(match[1]), item.get("requires-python") or "")
    if version is None:
        chosen = max(v for v in releases if not v.is_prerelease)
    elif Version(version) in releases:
        chosen = Version(version)
    else:
        fail(f"axolotl {version} is not on PyPI; releases: {', '.join(map(str, sorted(releases)[-5:]))}, ...")
    return str(chosen), releases[chosen]


def axolotl_release(version: str | None) -> tuple[str, str]:
    return release_from_index(pypi_files(), version)


def python_version(path: str) -> Version | None:
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError:
        return None
    return Version(out.stdout.strip()) if out.returncode == 0 else None


def candidate_pythons() -> list[str]:
    """python3.X on PATH, then pyenv's versions: what this machine has."""
    found = []
    for minor in range(20, 7, -1):
        path = shutil.which(f"python3.{minor}")
        if path:
            found.append(path)
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    found += sorted(glob.glob(f"{root}/versions/3.*/bin/python3"), reverse=True)
    return found


def choose_python(explicit: str | None, spec: SpecifierSet, axolotl: str) -> tuple[str, Version]:
    if explicit:
        version = python_version(explicit)
        if version is None:
            fail(f"{explicit} is not a Python interpreter that runs")
        if version not in spec:
            fail(
                f"axolotl {axolotl} requires Python {spec}; {explicit} is Python {version} "
                f"(give an interpreter that satisfies it with --python)"
            )
        return explicit, version
    seen = {}
    for path in candidate_pythons():
        version = python_version(path)
        if version is not None:
            seen[path] = version
    fits = [(v, p) for p, v in seen.items() if v in spec]
    if not fits:
        have = ", ".join(f"{p} ({v})" for p, v in seen.items()) or "none"
        fail(
            f"axolotl {axolotl} requires Python {spec}; no interpreter here satisfies it (found: {have}); "
            f"install one (pyenv, or Debian's python3.12) and give it with --python"
        )
    version, path = min(fits)  # Axolotl's lowest: its pins lag the newest Python (zstandard 0.22 on 3.13)
    return path, version


def run(step: str, cmd: list, log: Path, **kwargs) -> subprocess.CompletedProcess:
    start = time.monotonic()
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        proc = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, text=True, **kwargs)
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log})"
    print(f"  {step}: {status} in {time.monotonic() - start:.0f} s", flush=True)
    return proc


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    return {canonicalize_name(item["name"]): item["version"] for item in json.loads(out)}


def dry_run_changes(report: dict, installed: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new packages, installed packages whose version would change) in pip's --report."""
    new, changed = [], []
    for item in report["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        if name not in installed:
            new.append(f"{name} {version}")
        elif installed[name] != version:
            changed.append(f"{name} {installed[name]} -> {version}")
    return new, changed


def last_logged(log: Path, key: str) -> str:
    """The loss, chosen-answer NLL, perplexity and reward accuracy of the last log entry that has `key`."""
    entries = [
        ast.literal_eval(line[line.index("{") :])
        for line in log.read_text().splitlines()
        if line.startswith("{") and f"'{key}'" in line
    ]
    if not entries:
        return "(nothing logged)"
    prefix = key[: -len("loss")]
    shown = [f"{prefix}{name}" for name in ("loss", "nll_loss", "ppl", "rewards/accuracies")]
    return ", ".join(f"{name} {entries[-1][name]}" for name in shown if name in entries[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axolotl", help="Axolotl release to test (default: the newest on PyPI)")
    parser.add_argument(
        "--python",
        default=os.environ.get("COMPAT_PYTHON"),
        help="interpreter for the side environment (default: the oldest that Axolotl allows)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "compat")
    args = parser.parse_args(argv)

    axolotl, spec = axolotl_release(args.axolotl)
    python, py_version = choose_python(args.python, SpecifierSet(spec), axolotl)
    env_dir = args.out / f"axolotl-{axolotl}-py{py_version.major}.{py_version.minor}"
    venv, log = env_dir / "venv", env_dir / "log.txt"
    print(
        f"compat: axolotl {axolotl} (requires Python {spec or 'any'}) on {python} (Python {py_version}), in {env_dir}",
        flush=True,
    )
    env_dir.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    vpy = venv / "bin" / "python"
    pip = [vpy, "-m", "pip", "--disable-pip-version-check"]
    gguf = re.search(r'"(gguf==[0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]

    steps = []
    ok = lambda proc: proc.returncode == 0  # noqa: E731
    # From nothing each time (an earlier run's plugin would hide what installing it changes).
    shutil.rmtree(venv, ignore_errors=True)
    if not ok(run("virtual environment", [python, "-m", "venv", venv], log)):
        return 1
    if not ok(
        run(
            f"install axolotl=={axolotl} (torch as pip resolves it)",
            [*pip, "install", "-q", f"axolotl=={axolotl}"],
            log,
        )
    ):
        return 1
    installed = freeze(vpy)
    (env_dir / "freeze.json").write_text(json.dumps(installed, indent=1, sort_keys=True) + "\n")
    versions = {k: installed.get(k, "-") for k in ("axolotl", "torch", "transformers", "trl", "peft", "accelerate")}
    print("  environment: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)

    report_path = env_dir / "dry-run-report.json"
    proc = run(
        "pip install --dry-run '.[train]' into it",
        [*pip, "install", "--dry-run", "--quiet", "--report", report_path, f"{ROOT}[train]"],
        log,
    )
    if ok(proc):
        new, changed = dry_run_changes(json.loads(report_path.read_text()), installed)
        print(f"    would install: {', '.join(new) or 'nothing'}", flush=True)
        print(f"    would change: {', '.join(changed) or 'nothing'}", flush=True)
        steps.append(("no installed package changes", not changed))
    else:
        steps.append(("dry run", False))

    steps.append(
        (
            "install the plugin",
            ok(
                run(
                    "pip install -e '.[train]' and the test tools",
                    [*pip, "install", "-q", "-e", f"{ROOT}[train]", *TEST_TOOLS, gguf],
                    log,
                )
            ),
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    offline = subprocess.run([vpy, "-m", "orpo_demo.env"], capture_output=True, text=True, env=env, cwd=ROOT)
    env.update(line.split("=", 1) for line in offline.stdout.split())
    tests = [f"tests/{name}" for name in TRAIN_TESTS]
    proc = run(
        "training-side tests", [vpy, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], log, env=env, cwd=ROOT
    )
    summary = subprocess.run(["tail", "-n", "1", log], capture_output=True, text=True).stdout.strip()
    print(f"    {summary}", flush=True)
    steps.append(("training-side tests", ok(proc)))

    tiny = env_dir / "tiny"
    if ok(run("build the embedded model", [vpy, "-m", "orpo_demo.build", tiny], log, env=env, cwd=ROOT)):
        config = env_dir / "tiny-cpu.yml"
        text = (ROOT / "example_configs" / "tiny-cpu.yml").read_text().replace("build/tiny", str(tiny))
        config.write_text(
            re.sub(r"(?m)^max_steps: .*$", "max_steps: 30", text).replace("eval_steps: 50", "eval_steps: 30")
        )
        proc = run(
            "axolotl train (embedded model, 30 steps)",
            [venv / "bin" / "axolotl", "train", config],
            log,
            env=env,
            cwd=ROOT,
        )
        if ok(proc):
            for split in ("loss", "eval_loss"):
                print(
                    f"    last {split.replace('loss', 'log').replace('_', ' ')}: {last_logged(log, split)}", flush=True
                )
        steps.append(("axolotl train", ok(proc)))
    else:
        steps.append(("build the embedded model", False))

    failed = [name for name, passed in steps if not passed]
    print(
        f"compat: axolotl {axolotl}, Python {py_version}: "
        + (f"FAILED: {', '.join(failed)}" if failed else "all steps passed"),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
