"""Every private API of transformers' Trainer that the ORPO trainer relies on, in one module, checked
once against the installed version so that an upgrade that moves one fails with a message, not
with a silently wrong loss."""

from __future__ import annotations

import inspect

import transformers
from transformers import Trainer

from orpo_plugin.core.errors import OrpoError
from orpo_plugin.engines import engine_module

# name -> the parameters (after self) we call or override it with
PRIVATE_TRAINER_API = {
    # The optimizer step's item count, passed to compute_loss as num_items_in_batch: the ORPO
    # trainer returns [NLL tokens, pairs] over all micro-batches and ranks (exact accumulation).
    "_get_num_items_in_batch": ("batch_samples", "device"),
    # Moves a batch to the device (prediction_step uses it as Trainer.prediction_step does).
    "_prepare_inputs": ("inputs",),
}


class TrainerAPIError(OrpoError, RuntimeError):
    pass


def check_trainer_api() -> None:
    for name, params in PRIVATE_TRAINER_API.items():
        method = getattr(Trainer, name, None)
        found = tuple(inspect.signature(method).parameters)[1:] if method else None
        if found != params:
            raise TrainerAPIError(
                f"orpo_plugin: transformers {transformers.__version__} changed Trainer.{name} (expected "
                f"({', '.join(params)}), found {'nothing' if found is None else '(' + ', '.join(found) + ')'}); "
                f"gradient accumulation would be normalised wrongly. Install a transformers release that "
                f"Axolotl pins (see orpo_plugin/compat.py) or report it."
            )


class TrainerPrivateAPI:
    """Mixed into OrpoTrainer: the overrides of Trainer's private hooks, forwarding to public names."""

    def _get_num_items_in_batch(self, batch_samples, device):
        return self.step_counts(batch_samples, device)

    def prepare_inputs(self, inputs):
        return self._prepare_inputs(inputs)


def unwrap(model):
    """The transformers model under engine (DDP, DeepSpeed) and PEFT wrappers."""
    model = engine_module(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model
