"""Build trainers the way `axolotl train` does: validated config, Axolotl's RL builder."""

from __future__ import annotations

import copy

import tiny
import torch
from datasets import Dataset

# Prompts end with ChatML's "assistant\n" and answers start with a letter or digit, so a
# byte-level BPE never merges across the boundary: TRL's joint tokenization and our
# separate one give the same ids (the one TRL bug this data must avoid).
# What the plugin logs at every logging step (TRL's ORPO names).
METRICS = (
    "loss nll_loss log_odds_ratio log_odds_chosen logps/chosen logps/rejected rewards/chosen rewards/rejected "
    "rewards/margins rewards/accuracies"
).split()
PAIRS = [
    ("What is 12 + 30?", "12 + 30 = 42", "12 + 30 = 43"),
    ("What is 7 + 8?", "7 + 8 = 15", "The answer is 16, I think"),
    ("Please compute 90 - 45.", "90 - 45 = 45", "45"),
    ("What is 3 + 3?", "It is 6", "3 + 3 = 7 because I said so"),
    ("Say the sum of 1 and 2.", "3", "1 + 2 = 4"),
    ("What is 100 + 1?", "100 + 1 = 101", "100 + 1 = 1001"),
    ("Compute 5 - 9.", "5 - 9 = -4", "5 - 9 = 4"),
    ("What is 44 + 11?", "44 + 11 = 55", "44 + 11 = 54"),
]


def pair_dataset(tokenizer, n: int = 8) -> Dataset:
    rows = []
    for q, c, r in (PAIRS * (n // len(PAIRS) + 1))[:n]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        rows.append({"prompt": prompt, "chosen": c, "rejected": r})
    return Dataset.from_list(rows)


BASE_CFG = {
    "datasets": [{"path": "unused.jsonl", "ds_type": "json", "type": "chat_template.argilla"}],
    "sequence_len": 128,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1,
    "max_steps": 1,
    "learning_rate": 1e-3,
    "optimizer": "adamw_torch",
    "lr_scheduler": "constant",
    "bf16": False,
    "fp16": False,
    "tf32": False,
    "save_strategy": "no",
    "logging_steps": 1,
    "seed": 7,
    "dataloader_num_workers": 0,
    "dataset_num_proc": 1,
    "orpo_alpha": 0.1,
}


def make_cfg(base_model, output_dir, rl: str = "orpo_plugin", **overrides):
    """A validated, normalized Axolotl config; rl='orpo' gives Axolotl's built-in ORPO."""
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    raw = copy.deepcopy(BASE_CFG)
    raw.update(base_model=str(base_model), output_dir=str(output_dir), rl=rl)
    if rl == "orpo_plugin":
        raw["plugins"] = ["orpo_plugin.OrpoPlugin"]
    raw.update(overrides)
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    cfg = validate_config(cfg)
    normalize_config(cfg)
    from axolotl.cli.config import plugin_set_cfg

    plugin_set_cfg(cfg)
    return cfg


def load_model(model_dir, lora: bool, seed: int = 0):
    """The model a trainer gets: float32, optionally with a non-zero random LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if lora:
        torch.manual_seed(seed)
        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                init_lora_weights=False,
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def build_trainer(cfg, model, tokenizer, train_dataset, eval_dataset=None):
    from axolotl.core.builders import HFRLTrainerBuilder
    from axolotl.integrations.base import PluginManager

    builder = HFRLTrainerBuilder(cfg, model, tokenizer)
    builder.train_dataset = train_dataset
    builder.eval_dataset = eval_dataset
    trainer = builder.build(cfg.max_steps or 1)
    if cfg.plugins:
        PluginManager.get_instance().post_trainer_create(cfg, trainer)
    return trainer


def loss_metrics_grads(trainer, model):
    """One batch from the trainer's own dataloader: loss, logged metrics, trainable grads."""
    batch = next(iter(trainer.get_train_dataloader()))
    batch = trainer._prepare_inputs(batch)
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    logs = {"loss": loss.item()}
    trainer.log(logs)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), logs, grads


def tiny_tokenizer():
    return tiny.build_tokenizer(None)


def with_architecture(model_dir, out_dir, name: str):
    """A copy of a saved model whose config.json names another architecture class."""
    import json
    import shutil

    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config["architectures"] = [name]
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir
