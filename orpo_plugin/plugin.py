"""The Axolotl plugin: `plugins: [orpo_plugin.OrpoPlugin]` plus `rl: orpo_plugin`."""

from __future__ import annotations

import os

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger

from orpo_plugin.args import apply_rl_alias
from orpo_plugin.datasets import OrpoDataError, load_preference_data, split_field_maps
from orpo_plugin.evaluate import running_evaluate, trained_adapter

LOG = get_logger(f"axolotl.{__name__}")  # Axolotl shows INFO only from axolotl.* loggers


def _cpu_safe_precision(cfg) -> None:
    """`bf16: auto` without CUDA makes Axolotl pick fp16 weights and crash in the first
    matmul; on such a machine train in fp32 and say so."""
    if cfg.get("bf16") == "auto" and not torch.cuda.is_available():
        LOG.warning(
            "orpo_plugin: bf16: auto on a machine without CUDA -> training in fp32 "
            "(set bf16: false, fp16: false to silence this)"
        )
        cfg["bf16"] = False
        if cfg.get("fp16") in (None, "auto"):
            cfg["fp16"] = False


def _cpu_data_parallel(cfg) -> None:
    """Several processes (torchrun, accelerate launch) on a machine without CUDA:
    - Axolotl maps each rank to device index LOCAL_RANK, a GPU that does not exist, and
      from_pretrained crashes: keep every rank on the CPU;
    - Accelerate uses gloo DDP only when told to use the CPU (AxolotlTrainer rebuilds the
      accelerator from the environment); otherwise each rank trains alone, unsynchronised."""
    if torch.cuda.is_available() or (cfg.world_size or 1) <= 1:
        return
    if isinstance(cfg.device_map, dict) and any(isinstance(v, int) for v in cfg.device_map.values()):
        cfg.device_map = {"": "cpu"}
    os.environ["ACCELERATE_USE_CPU"] = "true"


class OrpoPlugin(BasePlugin):
    def get_input_args(self) -> str:
        return "orpo_plugin.args.OrpoArgs"

    def register(self, cfg: dict) -> None:
        # Before validation, so Axolotl's own ORPO validators already see `rl: orpo`.
        apply_rl_alias(cfg)
        split_field_maps(cfg)
        if cfg.get("orpo_plugin"):
            _cpu_safe_precision(cfg)

    def load_datasets(self, cfg, preprocess: bool = False):
        """Our own data pipeline for `rl: orpo_plugin` (datasets.py). Also the first hook
        after Axolotl's normalize_config and before the model loader reads cfg.device_map."""
        if not cfg.orpo_plugin:
            return None
        _cpu_data_parallel(cfg)
        try:
            return load_preference_data(cfg, preprocess=preprocess)
        except OrpoDataError as err:
            # Expected bad input: one clear message and a non-zero exit, no traceback.
            LOG.error(str(err))
            raise SystemExit(2) from None

    def pre_model_load(self, cfg) -> None:
        if cfg.orpo_plugin and running_evaluate():  # load_datasets, which does this for training, is not called
            _cpu_data_parallel(cfg)

    def pre_lora_load(self, cfg, model) -> None:
        """`axolotl evaluate` measures the adapter training saved in output_dir."""
        if not (cfg.orpo_plugin and running_evaluate()) or cfg.lora_model_dir:
            return
        adapter = trained_adapter(cfg)
        if adapter is None:
            LOG.error(
                f"orpo_plugin: axolotl evaluate: no trained adapter in output_dir {cfg.output_dir} "
                f"(adapter_config.json); train first, or name one with lora_model_dir"
            )
            raise SystemExit(2)
        cfg.lora_model_dir = adapter
        LOG.info(f"orpo_plugin: evaluating the adapter in {adapter}")

    def post_trainer_create(self, cfg, trainer) -> None:
        from orpo_plugin.trainer import OrpoSettings, OrpoTrainer

        if cfg.orpo_plugin and isinstance(trainer, OrpoTrainer):
            trainer.configure(OrpoSettings.from_cfg(cfg))
            LOG.info(f"orpo_plugin: {trainer.orpo}, batches: {type(trainer.data_collator).__name__}")
