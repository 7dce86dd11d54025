"""The house's one-way roads, checked on the source: the core imports neither side, training never
imports serving, serving never imports Axolotl at import time (nor torch on the GGUF paths), and
each thing written once lives in one module."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import tiny
from test_cli import BIN, _env

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("orpo_plugin", "serve", "orpo_demo")


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path


def _imports(path: Path):
    """(imported module, at import time?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    guarded = {id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            yield name, id(node) in top_level or id(node) in guarded


def _side(module: str) -> str:
    if module.startswith("orpo_plugin.core"):
        return "core"
    return {"orpo_plugin": "training", "serve": "serving", "orpo_demo": "demo"}[module.split(".")[0]]


def _is(name: str, *roots: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


# (side, what it may never import, only at import time?)
RULES = [
    ("core", ("orpo_plugin", "serve", "orpo_demo", "axolotl", "llama_cpp", "gguf", "transformers", "peft"), False),
    ("core", ("torch",), True),
    ("training", ("serve", "orpo_demo", "llama_cpp", "gguf"), False),
    ("serving", ("axolotl",), True),
    ("serving", ("orpo_demo",), False),
]


def test_every_import_runs_one_way():
    broken = []
    for module, path in _modules():
        side = _side(module)
        for name, at_import_time in _imports(path):
            if side == "core" and _is(name, "orpo_plugin.core"):
                continue
            if side == "serving" and _is(name, "orpo_plugin") and not _is(name, "orpo_plugin.core"):
                broken.append(f"{module} imports {name}: serving uses the core only")
            for rule_side, forbidden, import_time_only in RULES:
                if rule_side == side and _is(name, *forbidden) and (at_import_time or not import_time_only):
                    broken.append(f"{module} imports {name} ({side} must not{' at import time' * import_time_only})")
    assert not broken, "\n".join(broken)


def test_the_walk_sees_a_forbidden_import(tmp_path):
    """The checker itself: a training module importing serve is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\ndef f():\n    from serve.export.convert import convert\n")
    assert ("serve.export.convert", False) in list(_imports(bad))
    assert ("os", True) in list(_imports(bad))


def _internals_pattern() -> str:
    """A pattern for every llama-cpp-python internal serve.llama says it uses (its INTERNALS), and
    llama_cpp's private modules."""
    from serve.llama import INTERNALS

    attributes = [name.split(".")[-1] for name in INTERNALS if name.startswith("Llama.")]
    names = [rf"\.{re.escape(a)}\b" if a.startswith("_") else rf"\.{re.escape(a)}\b(?!\()" for a in attributes]
    return "|".join([*names, r"llama_cpp\._\w+", r"get_llama_proxy"])


INTERNALS = _internals_pattern()
# What the project writes once: (pattern, the one module allowed to contain it, what it is). The
# benchmarks' baselines call llama-cpp-python's own API on purpose; they share the environment only.
ONE_PLACE = [
    (INTERNALS, "serve/llama.py", "llama-cpp-python internals"),
    (r"LlamaModel\.\w+ = ", "serve/llama.py", "patching llama-cpp-python"),
    (r"llama_cpp\.Llama\(", "serve/llama.py", "opening a GGUF with llama.cpp"),
    (r"_get_num_items_in_batch|\._prepare_inputs\(", "orpo_plugin/compat.py", "transformers Trainer private API"),
    (r"os\.replace\(|\.rename\(|\.replace\(\w*path\)|\.partial", "orpo_plugin/core/atomic.py", "atomic writes"),
    (
        r"torch\.logsumexp|log_softmax\(-?1|F\.log_softmax|logaddexp\.reduce|\.gather\(-1",
        "orpo_plugin/core/logprobs.py",
        "log-prob of a target token",
    ),
    (r"HF_HUB_OFFLINE", "orpo_demo/env.py", "the offline environment"),
    (
        r"render_jinja_template|ImmutableSandboxedEnvironment",
        "orpo_plugin/core/chat_template.py",
        "rendering chat templates",
    ),
]
PRODUCT = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]


@pytest.mark.parametrize("pattern,owner,what", ONE_PLACE, ids=[w for _, _, w in ONE_PLACE])
def test_one_module_owns_it(pattern, owner, what):
    files = PRODUCT + [ROOT / "Makefile"]
    if what == "the offline environment":
        files += sorted((ROOT / "benchmarks").glob("*.py"))
        files += [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]
    users = sorted(str(p.relative_to(ROOT)) for p in files if re.search(pattern, p.read_text()))
    assert users == [owner], f"{what}: expected only in {owner}, found in {users}"


def _imported(stderr: str) -> set[str]:
    """Top-level package names from `-X importtime` output."""
    names = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)", stderr, re.M)
    return {name.split(".")[0] for name in names}


def _run(*args, importtime=True, stdin=None, timeout=300):
    env = dict(_env(), PYTHONPROFILEIMPORTTIME="1") if importtime else _env()
    return subprocess.run(
        [str(BIN / "orpo"), *map(str, args)], env=env, capture_output=True, text=True, input=stdin, timeout=timeout
    )


HEAVY = {"torch", "axolotl", "transformers", "peft", "trl"}


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["serve", "--help"],
        ["merge-and-quantize", "--help"],
        ["score", "--help"],
        ["chat", "--help"],
        ["plot", "--help"],
    ],
)
def test_help_imports_no_heavy_library_and_prints_no_warning(args):
    proc = _run(*args)
    assert proc.returncode == 0 and "Usage: orpo" in proc.stdout
    assert not _imported(proc.stderr) & HEAVY, _imported(proc.stderr) & HEAVY
    quiet = _run(*args, importtime=False)
    assert quiet.stderr == ""


def test_import_serve_cli_imports_neither_axolotl_nor_torch():
    proc = subprocess.run(
        [str(BIN / "python"), "-X", "importtime", "-c", "import serve.cli, orpo_plugin; orpo_plugin.__name__"],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert _imported(proc.stderr) and not _imported(proc.stderr) & HEAVY


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from serve.export.convert import convert

    root = tmp_path_factory.mktemp("layout")
    tiny.build_model("llama", root / "hf", tokenizer=tiny.build_tokenizer(None))
    pairs = root / "pairs.jsonl"
    tiny.write_jsonl(tiny.conversion_pairs(3, seed=0), pairs)
    return convert(root / "hf", root / "model.gguf", "f16"), pairs


def test_gguf_commands_run_without_torch_or_axolotl(gguf, tmp_path):
    from orpo_demo.serving import running

    model, pairs = gguf
    score = _run("score", model, "--pairs", pairs, "--n-threads", "2")
    assert score.returncode == 0 and "| accuracy |" not in score.stderr and "model.gguf" in score.stdout
    assert _imported(score.stderr) and not _imported(score.stderr) & HEAVY
    chat = _run("chat", model, "--n-threads", "2", "--max-tokens", "4", stdin="Hello\n/exit\n")
    assert chat.returncode == 0 and "chatting with" in chat.stdout
    assert not _imported(chat.stderr) & HEAVY
    import httpx

    log = tmp_path / "serve.log"
    with running(
        model, "--n-threads", "2", "--n-ctx", "256", env=dict(_env(), PYTHONPROFILEIMPORTTIME="1"), log=log
    ) as url:
        assert (
            httpx.post(f"{url}/v1/score", json={"prompt": "Hi", "chosen": "a", "rejected": "b"}, timeout=60).status_code
            == 200
        )
        assert (
            httpx.post(
                f"{url}/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
                timeout=60,
            ).status_code
            == 200
        )
    served = _imported(log.read_text())
    assert {"llama_cpp", "uvicorn"} <= served and not served & HEAVY


def test_an_untested_llama_cpp_python_stops_with_one_message(gguf, monkeypatch):
    import llama_cpp
    from click.testing import CliRunner

    from serve.cli import main

    monkeypatch.setattr(llama_cpp, "__version__", "0.3.99")
    model, pairs = gguf
    for args in (["serve", str(model)], ["score", str(model), "--pairs", str(pairs)], ["chat", str(model)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and result.exception.__class__ is SystemExit, args
        assert result.output.strip().splitlines() == [
            "Error: llama-cpp-python 0.3.99 is not a version this project was tested with (0.3.36): scoring reads "
            "its internals (see serve/llama.py). Install llama-cpp-python==0.3.36."
        ], result.output


def test_a_changed_trainer_api_stops_with_one_message(monkeypatch):
    from transformers import Trainer

    from orpo_plugin.compat import TrainerAPIError, check_trainer_api

    check_trainer_api()
    monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda self, batch_samples: 0)
    with pytest.raises(
        TrainerAPIError,
        match=r"changed Trainer\._get_num_items_in_batch \(expected \(batch_samples, "
        r"device\), found \(batch_samples\)\)",
    ):
        check_trainer_api()


def _project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere (module level or inside functions)."""
    modules = dict(_modules())
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name, _ in _imports(path):
            # `from serve.export import parity` names serve.export.parity; `from x import func` names x
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_cycle_anywhere():
    """Not even through an import inside a function (serve.export and serve.preference once imported
    each other that way)."""
    graph = _project_imports()
    assert graph["serve.export.pipeline"] >= {"serve.export.preference", "serve.export.quantize"}
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


MAX_LINES = 450


def test_no_product_module_is_over_max_lines():
    long = {module: n for module, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (over {MAX_LINES} lines): {long}"


def test_the_core_names_no_serving_type():
    """Not even in a docstring or a type hint: the core is what both sides build on."""
    pattern = re.compile(r"\bserve[./]\w|GGUFTokenizer|\bArchitecture\b|llama_cpp")
    named = {str(p.relative_to(ROOT)): pattern.findall(p.read_text()) for p in (ROOT / "orpo_plugin/core").glob("*.py")}
    assert not {path: found for path, found in named.items() if found}
