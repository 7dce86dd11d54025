"""Axolotl's own `axolotl evaluate` on `rl: orpo_plugin` runs.

Axolotl's evaluate loads the model, builds the trainer and calls `trainer.evaluate()` on the train
and eval datasets; it calls no dataset hook of a plugin, nor `post_trainer_create`. So:
- the plugin's `pre_lora_load` hook points `lora_model_dir` at `output_dir`, where training saved
  the adapter (Axolotl would otherwise evaluate a freshly initialised LoRA);
- the ORPO trainer, built while this command runs, takes its settings from the config and
  evaluates the pairs the plugin's own pipeline made for training (from dataset_prepared_path when
  prepared) wherever Axolotl passes its own rows.
Nothing of Axolotl is patched."""

from __future__ import annotations

import sys
from pathlib import Path


def running_evaluate() -> bool:
    """This process runs `axolotl evaluate`: in-process (--launcher python) or as a rank that the
    launcher started (`-m axolotl.cli.evaluate`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == "axolotl.cli.evaluate":
        return True
    return len(sys.argv) > 1 and Path(sys.argv[0]).name == "axolotl" and sys.argv[1] == "evaluate"


def evaluated_cfg():
    """The validated Axolotl config of the `axolotl evaluate` this process runs for an ORPO
    plugin run (Axolotl's plugin manager holds it), else None."""
    if not running_evaluate():
        return None
    from axolotl.integrations.base import PluginManager

    cfg = PluginManager.get_instance().cfg
    return cfg if cfg is not None and cfg.get("orpo_plugin") else None


def trained_adapter(cfg) -> str | None:
    """The adapter to evaluate: lora_model_dir if set, else output_dir where training saved it;
    None for a full fine-tune. A missing one is an error (nothing trained to evaluate)."""
    if not cfg.adapter or cfg.lora_model_dir:
        return cfg.lora_model_dir
    saved = Path(cfg.output_dir or ".")
    if not (saved / "adapter_config.json").is_file():
        return None
    return str(saved)
