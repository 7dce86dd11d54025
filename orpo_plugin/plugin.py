"""The Axolotl plugin: `plugins: [orpo_plugin.OrpoPlugin]` plus `rl: orpo_plugin`."""

from __future__ import annotations

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from orpo_plugin.args import apply_rl_alias

LOG = get_logger(__name__)


def _cpu_safe_precision(cfg) -> None:
    """`bf16: auto` without CUDA makes Axolotl pick fp16 weights and crash in the first
    matmul; on such a machine train in fp32 and say so."""
    if cfg.get("bf16") == "auto" and not torch.cuda.is_available():
        LOG.warning("orpo_plugin: bf16: auto on a machine without CUDA -> training in fp32 "
                    "(set bf16: false, fp16: false to silence this)")
        cfg["bf16"] = False
        if cfg.get("fp16") in (None, "auto"):
            cfg["fp16"] = False


class OrpoPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "orpo_plugin.args.OrpoArgs"

    def register(self, cfg: dict) -> None:
        # Before validation, so Axolotl's own ORPO validators already see `rl: orpo`.
        apply_rl_alias(cfg)
        if cfg.get("orpo_plugin"):
            _cpu_safe_precision(cfg)

    def post_trainer_create(self, cfg, trainer) -> None:
        from orpo_plugin.trainer import OrpoSettings, OrpoTrainer

        if cfg.orpo_plugin and isinstance(trainer, OrpoTrainer):
            trainer.orpo = OrpoSettings.from_cfg(cfg)
            LOG.info(f"orpo_plugin: {trainer.orpo}")
