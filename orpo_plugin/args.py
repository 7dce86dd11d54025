"""Every YAML key of the plugin, in one pydantic model merged into Axolotl's config schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

RL_NAME = "orpo_plugin"
TRAINER_CLS = "orpo_plugin.trainer.OrpoTrainer"


def apply_rl_alias(data: dict) -> dict:
    """`rl: orpo_plugin` is not in Axolotl's RL enum: validate it as `orpo` (which every ORPO
    branch in Axolotl keys on: datasets, no reference model, LoRA handling) and remember that
    the plugin was asked for, with our trainer in place of TRL's."""
    if isinstance(data, dict) and data.get("rl") == RL_NAME:
        data["rl"] = "orpo"
        data["orpo_plugin"] = True
        data["trainer_cls"] = data.get("trainer_cls") or TRAINER_CLS
    return data


# Axolotl keys that split what the loss reads across ranks -> what they split.
# The deprecated name first: Axolotl 0.21 copies it into context_parallel_size before we see the
# config, and the message should name the key the user wrote.
SPLITTING_PARALLELISM = {
    "sequence_parallel_degree": "splits each sequence across GPUs",
    "context_parallel_size": "splits each sequence across GPUs",
    "tensor_parallel_size": "splits the LM head's vocabulary and every layer across GPUs",
}


class OrpoArgs(BaseModel):
    """Keys of `plugins: [orpo_plugin.OrpoPlugin]`. `orpo_alpha` (lambda, default 0.1) and
    `train_on_inputs` (NLL on the prompt too) are Axolotl's own keys and keep their meaning."""

    orpo_plugin: bool | None = Field(
        default=None,
        json_schema_extra={"description": "Set by `rl: orpo_plugin`; the plugin acts only then."},
    )
    orpo_on_bad_row: Literal["error", "skip"] | None = Field(
        default="error",
        json_schema_extra={
            "description": "A row that cannot be trained on (missing or empty field, chosen == "
            "rejected, malformed conversation, invalid JSON): 'error' stops preprocessing with a "
            "message naming dataset, row, field and reason; 'skip' drops it and reports counts."
        },
    )
    orpo_loss: str | None = Field(
        default="orpo",
        json_schema_extra={
            "description": "Preference loss by name, from those registered through the "
            "orpo_plugin pluggy hook `register_losses` (built in: orpo)."
        },
    )
    orpo_field_maps: dict | None = Field(
        default=None,
        json_schema_extra={
            "description": "Internal: field_prompt/field_chosen/... of the dataset "
            "entries, moved here by the plugin because Axolotl's dataset schema drops them."
        },
    )
    orpo_prefix_sharing: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "One sequence per pair, [prompt][chosen][rejected], so the prompt is "
            "computed once (exact). Default: on where the attention backend takes a custom mask "
            "(sdpa, eager); with FlashAttention the pairs run unshared."
        },
    )
    orpo_packing: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "With prefix sharing: pack several pairs per row up to "
            "sequence_len, no attention across pairs (exact). Default: on."
        },
    )
    orpo_logprob_method: Literal["auto", "fused", "chunked"] | None = Field(
        default="auto",
        json_schema_extra={
            "description": "How log-probs are computed without full logits: 'fused' uses "
            "torch>=2.13's chunked linear_cross_entropy, 'chunked' checkpoints the LM head per "
            "chunk (any head: LoRA, quantized, soft-capped), 'auto' picks fused where it applies."
        },
    )
    orpo_chunk_tokens: int | None = Field(
        default=None,
        gt=0,
        json_schema_extra={"description": "Tokens per LM-head chunk; default ~64 MiB of fp32 logits."},
    )

    @model_validator(mode="before")
    @classmethod
    def rl_alias(cls, data):
        return apply_rl_alias(data)

    @field_validator("orpo_loss")
    @classmethod
    def check_orpo_loss(cls, value):
        from orpo_plugin.losses import get_losses

        if value is not None and value not in get_losses():
            raise ValueError(
                f"orpo_loss {value!r} is not registered; available: "
                f"{', '.join(sorted(get_losses()))} (add one with the register_losses hook)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def check_parallelism(cls, data):
        """Data parallelism (DDP, DeepSpeed ZeRO-1/2/3, FSDP) keeps each sequence and the LM head's
        vocabulary whole on one rank; these split them, and the ORPO loss needs both whole."""
        if isinstance(data, dict) and data.get("orpo_plugin"):
            for key, split in SPLITTING_PARALLELISM.items():
                size = data.get(key)
                if isinstance(size, int) and size > 1:
                    raise ValueError(
                        f"{key}: {size} is not supported with rl: orpo_plugin: it {split}, and the ORPO "
                        f"loss reads each answer's log-probs whole on one rank. Remove {key} (or set it to "
                        f"1); to spread a model that does not fit one GPU, use DeepSpeed ZeRO-3 or FSDP2 "
                        f"(README: Several GPUs and nodes)."
                    )
        return data

    @model_validator(mode="before")
    @classmethod
    def check_orpo_alpha(cls, data):
        if isinstance(data, dict) and data.get("orpo_plugin"):
            alpha = data.get("orpo_alpha")
            if alpha is not None and (not isinstance(alpha, (int, float)) or alpha < 0):
                raise ValueError(
                    f"orpo_alpha must be a number >= 0 (the weight of the odds-ratio term, "
                    f"0.1 in the ORPO paper); got {alpha!r}"
                )
        return data
