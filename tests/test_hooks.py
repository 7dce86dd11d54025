"""pluggy extension points: built-ins registered through the hooks, a third-party format found
through the `orpo_plugin` entry-point group and trained with, a registered loss variant."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from helpers import build_trainer, load_model, loss_metrics_grads, make_cfg, pair_dataset
from pydantic import ValidationError
from test_cli import _env, _tiny_config

from orpo_plugin import PreferenceLoss, hookimpl
from orpo_plugin.core import registry
from orpo_plugin.core.formats import get_formats

ACME = textwrap.dedent('''
    """A third-party format: rows of instruction / good / bad."""
    from orpo_plugin import Pair, PreferenceFormat, hookimpl
    from orpo_plugin.core.formats import distinct, text

    def to_pair(row):
        prompt = [{"role": "user", "content": text(row, "instruction")}]
        return distinct(Pair(prompt, text(row, "good"), text(row, "bad")))

    @hookimpl
    def register_formats(register):
        register(PreferenceFormat("acme", "instruction, good, bad",
                                  lambda row: {"instruction", "good", "bad"} <= row.keys(), to_pair))
''')


@pytest.fixture()
def acme_site(tmp_path):
    """An installed-looking package: a module plus dist-info with an entry point."""
    site = tmp_path / "site"
    (site / "acme_orpo-0.1.dist-info").mkdir(parents=True)
    (site / "acme_orpo.py").write_text(ACME)
    (site / "acme_orpo-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-orpo\nVersion: 0.1\n")
    (site / "acme_orpo-0.1.dist-info" / "entry_points.txt").write_text("[orpo_plugin]\nacme = acme_orpo\n")
    return site


def test_builtins_come_through_the_same_hooks():
    from orpo_plugin.losses import get_losses
    from serve.export.architectures import get_architectures

    assert {"prompt", "conversation", "question"} <= set(get_formats())
    assert "orpo" in get_losses()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(get_architectures())
    names = {registry.pm.get_name(p) for p in registry.pm.get_plugins()}
    assert {"orpo_plugin.core.formats", "orpo_plugin.losses", "serve.export.architectures"} <= names


def test_each_consumer_registers_only_its_own_hook():
    """Looking up a loss (training) registers no GGUF architecture and imports neither gguf nor
    serve; looking up formats (serving) imports no torch."""
    code = (
        "import sys; from orpo_plugin.losses import get_losses; get_losses(); "
        "from orpo_plugin.core import registry; "
        "print(sorted(registry.pm.get_name(p) for p in registry.pm.get_plugins())); "
        "print('gguf' in sys.modules, any(m.startswith('serve') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['orpo_plugin.losses']", "False False"]
    code = (
        "import sys; from orpo_plugin.core.formats import get_formats; print(sorted(get_formats())); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['conversation', 'prompt', 'question']", "False"]


def test_entry_point_format_is_discovered(acme_site):
    env = dict(_env(), PYTHONPATH=str(acme_site))
    out = subprocess.run(
        [sys.executable, "-c", "from orpo_plugin.core.formats import get_formats; print(sorted(get_formats()))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "'acme'" in out.stdout


def test_third_party_format_trains_through_the_cli(acme_site, tmp_path, tiny_default):
    rows = [{"instruction": f"What is {i} + {i}?", "good": f"{2 * i}", "bad": f"{2 * i + 1}"} for i in range(16)]
    data = tmp_path / "acme.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _tiny_config(
        tmp_path,
        tiny_default,
        max_steps=2,
        test_datasets=None,
        eval_steps=None,
        datasets=[{"path": str(data), "ds_type": "json", "type": "orpo_plugin.preference"}],
    )
    proc = subprocess.run(
        [sys.executable.replace("python", "axolotl"), "train", str(config), "--launcher", "python"],
        cwd=tmp_path,
        env=dict(_env(), PYTHONPATH=str(acme_site)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{data} [acme]: 16 rows -> 16 pairs" in proc.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def _margin_penalty(chosen_avg, rejected_avg):
    return -F.logsigmoid(chosen_avg - rejected_avg)


@pytest.fixture()
def margin_loss():
    plugin = types.SimpleNamespace(
        register_losses=hookimpl(
            lambda register: register(PreferenceLoss("margin", _margin_penalty, include_nll=False))
        )
    )
    registry.pm.register(plugin, name="test-margin")
    registry.refresh()
    yield
    registry.pm.unregister(name="test-margin")
    registry.refresh()


def test_registered_loss_is_selected_by_orpo_loss(margin_loss, model_dirs, tokenizer, tmp_path, fresh_plugins):
    cfg = make_cfg(model_dirs["llama"], tmp_path, orpo_loss="margin", orpo_alpha=0.5, micro_batch_size=1)
    model = load_model(model_dirs["llama"], lora=True)
    trainer = build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer, n=1))
    assert trainer.orpo.loss == "margin"
    loss, logs, _ = loss_metrics_grads(trainer, model)
    a, b = torch.tensor(logs["logps/chosen"]), torch.tensor(logs["logps/rejected"])
    assert loss == pytest.approx(0.5 * _margin_penalty(a, b).item(), rel=1e-5)  # no NLL term
    assert logs["nll_loss"] > 0  # still reported


def test_unknown_loss_name_lists_the_registered_ones(model_dirs, tmp_path, fresh_plugins):
    with pytest.raises(ValidationError, match=r"orpo_loss 'simpo' is not registered; available: orpo"):
        make_cfg(model_dirs["llama"], tmp_path, orpo_loss="simpo")


def test_two_registrations_of_one_name_are_refused():
    plugin = types.SimpleNamespace(
        register_losses=hookimpl(lambda register: register(PreferenceLoss("orpo", _margin_penalty)))
    )
    from orpo_plugin.losses import get_losses

    registry.pm.register(plugin, name="test-dup")
    registry.refresh()
    try:
        with pytest.raises(ValueError, match="two plugins register 'orpo'"):
            get_losses()
    finally:
        registry.pm.unregister(name="test-dup")
        registry.refresh()
