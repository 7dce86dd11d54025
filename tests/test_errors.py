"""Every command, each expected failure it can meet: exit status 1, one line on stderr naming what
is wrong, no traceback; ORPO_DEBUG=1 keeps the traceback. The commands run as users run them
(the installed `orpo` script, Axolotl's `axolotl` with our command), never in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from test_cli import BIN, _env

from orpo_plugin.core.errors import OrpoError


def _run(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], env=env or _env(), cwd=cwd, capture_output=True, text=True, timeout=300
    )


def _one_line(proc, *words) -> None:
    """Exit 1 (2 for click's usage errors, after its usage hint), one error, no traceback. The error
    is one line, but for a row of unknown format, whose message goes on to list the accepted shapes."""
    assert proc.returncode == (2 if proc.stderr.startswith("Usage: ") else 1), (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    if "Accepted shapes" not in lines[0]:
        assert proc.stderr.rstrip().endswith(lines[0]), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_default):
    """Inputs a user can get wrong: files that are not what they are named, a tokenizer without a
    chat template, pairs that do not parse or do not fit."""
    root = tmp_path_factory.mktemp("broken")
    (root / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    (root / "bad.jsonl").write_text('{"prompt": "hi", "chosen": "a"}\n')
    long_prompt = " ".join(["12 plus 34"] * 2000)  # far past max_position_embeddings (2048)
    (root / "long.jsonl").write_text(json.dumps({"prompt": long_prompt, "chosen": "46", "rejected": "45"}) + "\n")
    plain = root / "no-template"
    shutil.copytree(tiny_default / "model", plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    (root / "empty").mkdir()
    (root / "a-file").write_text("not a directory")
    return {"root": root, "model": tiny_default / "model", "plain": plain, "eval": tiny_default / "data" / "eval.jsonl"}


def _export(b, *args):
    return (BIN / "orpo", "merge-and-quantize", "--base", b["model"], "--quant", "f16", *args)


# name -> (argv from the fixture, words the one line must hold)
CASES = {
    "export: no such base": (
        lambda b: _export(b, "--base", b["root"] / "nowhere", "--out", b["root"] / "o"),
        ["nowhere"],
    ),
    "export: unknown type": (lambda b: _export(b, "--quant", "q9", "--out", b["root"] / "o"), ["q9", "choose from"]),
    "export: out is a file": (lambda b: _export(b, "--out", b["root"] / "a-file"), ["a-file", "is a file"]),
    "export: keep-accuracy without pairs": (
        lambda b: _export(b, "--out", b["root"] / "o", "--keep-accuracy", "0.9"),
        ["--keep-accuracy", "--eval-pairs"],
    ),
    "export: a bad pair": (
        lambda b: _export(b, "--out", b["root"] / "o", "--eval-pairs", b["root"] / "bad.jsonl"),
        ["bad.jsonl", "row 0 (line 1)"],
    ),
    "export: a pair too long": (
        lambda b: _export(b, "--out", b["root"] / "o", "--eval-pairs", b["root"] / "long.jsonl"),
        ["held-out pair 1", "max_position_embeddings"],
    ),
    "export: no chat template": (
        lambda b: _export(b, "--base", b["plain"], "--out", b["root"] / "o", "--eval-pairs", b["eval"]),
        ["chat template"],
    ),
    "serve: not a GGUF": (lambda b: (BIN / "orpo", "serve", b["root"] / "not.gguf"), ["not.gguf", "GGUF"]),
    "serve: no such file": (lambda b: (BIN / "orpo", "serve", b["root"] / "gone.gguf"), ["gone.gguf"]),
    "score: not a GGUF": (
        lambda b: (BIN / "orpo", "score", b["root"] / "not.gguf", "--pairs", b["eval"]),
        ["not.gguf"],
    ),
    "score: a bad pair": (
        lambda b: (BIN / "orpo", "score", b["model"], "--pairs", b["root"] / "bad.jsonl"),
        ["bad.jsonl"],
    ),
    "chat: not a GGUF": (lambda b: (BIN / "orpo", "chat", b["root"] / "not.gguf"), ["not.gguf"]),
    "plot: no history": (lambda b: (BIN / "orpo", "plot", b["root"] / "empty"), ["orpo_log_history.jsonl"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_ends_an_expected_error_in_one_line(broken, case):
    argv, words = CASES[case]
    proc = _run(*argv(broken))
    _one_line(proc, *words)
    assert not (broken["root"] / "o").exists() or not list((broken["root"] / "o").iterdir())


AXOLOTL_CONFIGS = {
    "not YAML": ("base_model: [unclosed\n", ["cfg.yml", "YAML"]),
    "a list": ("- base_model\n", ["cfg.yml", "mapping"]),
    "missing keys": ("adapter: lora\n", ["cfg.yml", "base_model", "output_dir"]),
    "a bad export block": ("base_model: m\noutput_dir: o\nexport: {quantize: [Q9_X]}\n", ["export.quantize", "Q9_X"]),
}


@pytest.mark.parametrize("case", list(AXOLOTL_CONFIGS))
def test_axolotl_merge_and_quantize_ends_a_bad_config_in_one_line(tmp_path, case):
    text, words = AXOLOTL_CONFIGS[case]
    (tmp_path / "cfg.yml").write_text(text)
    _one_line(_run(BIN / "axolotl", "merge-and-quantize", "cfg.yml", cwd=tmp_path), *words)


def test_train_only_install_is_told_what_to_install(tmp_path):
    """`axolotl merge-and-quantize` where gguf is not installed ([train] without [serve]): the
    import is refused as it is in such an environment, through Axolotl's own CLI."""
    (tmp_path / "cfg.yml").write_text(f"base_model: {tmp_path}\noutput_dir: {tmp_path}\n")
    code = (
        "import sys; sys.modules['gguf'] = None; sys.argv = ['axolotl', 'merge-and-quantize', 'cfg.yml'];"
        "from axolotl.cli.main import main; main()"
    )
    _one_line(_run(sys.executable, "-c", code, cwd=tmp_path), "gguf", "orpo-plugin[serve]")


def test_debug_switch_keeps_the_traceback(broken):
    proc = _run(BIN / "orpo", "serve", broken["root"] / "not.gguf", env=dict(_env(), ORPO_DEBUG="1"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "GGUFError" in proc.stderr


def test_every_error_class_is_an_orpo_error():
    """Every exception class the project defines (outside the HTTP models) has the one base."""
    import importlib
    import inspect
    import pkgutil

    import orpo_demo
    import orpo_plugin
    import serve

    found = []
    for package in (orpo_plugin, serve, orpo_demo):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, Exception) and cls.__module__ == info.name:
                    found.append(cls)
    assert len(found) >= 17
    assert [cls.__qualname__ for cls in found if not issubclass(cls, OrpoError)] == []
