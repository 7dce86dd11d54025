"""OrpoTrainer: Axolotl's trainer machinery with our own ORPO forward and loss.

L = NLL + alpha * mean_pairs softplus(-z). Per micro-batch we compute sums, and divide by
counts taken over the whole optimizer step (all gradient-accumulation micro-batches, all
ranks), so 4x1 accumulation equals 1x4 and N ranks equal one process with the same global
batch. Logits exist only at scored positions, a chunk at a time (see logprobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger

from orpo_plugin import odds
from orpo_plugin.logprobs import head_logits, logit_transform, token_logprobs
from orpo_plugin.pairs import IGNORE_INDEX, PairCollator, tokenize_dataset
from orpo_plugin.plugins import get_losses

LOG = get_logger(f"axolotl.{__name__}")  # Axolotl shows INFO only from axolotl.* loggers
_NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: run the model without its head


@dataclass
class OrpoSettings:
    alpha: float = 0.1
    train_on_inputs: bool = False  # NLL on prompt + response (TRL's choice) instead of response only
    chunk_tokens: int | None = None
    logprob_method: str = "auto"
    loss: str = "orpo"  # a name registered through the register_losses hook

    @classmethod
    def from_cfg(cls, cfg) -> "OrpoSettings":
        alpha = cfg.orpo_alpha if cfg.orpo_alpha is not None else cls.alpha
        return cls(
            alpha=float(alpha),
            train_on_inputs=bool(cfg.train_on_inputs),
            chunk_tokens=cfg.orpo_chunk_tokens,
            logprob_method=cfg.orpo_logprob_method or "auto",
            loss=cfg.orpo_loss or "orpo",
        )


@dataclass
class PairBatchStats:
    """Sums for one batch: the loss is built from them and the metrics accumulate them."""

    loss_nll_sum: torch.Tensor  # differentiable
    loss_or_sum: torch.Tensor   # differentiable
    pair_sums: torch.Tensor     # detached, odds.PAIR_SUMS order
    n_pairs: int
    n_nll_tokens: int


def nll_target_mask(batch: dict[str, torch.Tensor], train_on_inputs: bool) -> torch.Tensor:
    """Which next-token targets (positions 1..T-1) the NLL covers: chosen rows only."""
    labels, attention = batch["labels"][:, 1:], batch["attention_mask"][:, 1:]
    mask = attention.bool() if train_on_inputs else labels != IGNORE_INDEX
    mask = mask.clone()
    mask[labels.shape[0] // 2:] = False
    return mask


def orpo_batch_stats(model, batch: dict[str, torch.Tensor], settings: OrpoSettings) -> PairBatchStats:
    """Run the model on a PairCollator batch and return the pieces of the ORPO loss."""
    input_ids, attention = batch["input_ids"], batch["attention_mask"]
    n_pairs = input_ids.shape[0] // 2
    out = model(
        input_ids=input_ids, attention_mask=attention, use_cache=False,
        output_hidden_states=True, logits_to_keep=_NO_LOGITS.to(input_ids.device),
    )
    hidden = out.hidden_states[-1][:, :-1]  # final-norm output predicting tokens 1..T-1
    del out
    targets = input_ids[:, 1:]
    scored = batch["labels"][:, 1:] != IGNORE_INDEX
    nll_mask = nll_target_mask(batch, settings.train_on_inputs)
    selected = scored | nll_mask

    base = _unwrap(model)
    head = base.get_output_embeddings()
    scale, softcap = logit_transform(base.config)
    logp = token_logprobs(
        hidden[selected], targets[selected], head, chunk_tokens=settings.chunk_tokens,
        scale=scale, softcap=softcap, method=settings.logprob_method,
    )
    # Scatter the selected log-probs back to per-row sums.
    row_of = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(selected)[selected]
    is_scored, is_nll = scored[selected], nll_mask[selected]
    zeros = logp.new_zeros(input_ids.shape[0])
    resp_sum = zeros.index_add(0, row_of, logp * is_scored)
    resp_len = scored.sum(1).clamp(min=1)  # collation guarantees >= 1 (EOS); clamp keeps 0/0 out
    avg = resp_sum / resp_len
    chosen_avg, rejected_avg = avg[:n_pairs], avg[n_pairs:]
    z = odds.log_odds_ratio(chosen_avg, rejected_avg)
    return PairBatchStats(
        loss_nll_sum=-(logp * is_nll).sum(),
        loss_or_sum=get_losses()[settings.loss].penalty(chosen_avg, rejected_avg).sum(),
        pair_sums=odds.pair_sums(chosen_avg, rejected_avg, z),
        n_pairs=n_pairs,
        n_nll_tokens=int(nll_mask.sum()),
    )


def check_final_hidden_state(model, input_ids: torch.Tensor) -> None:
    """The loss reads hidden_states[-1] as the LM head's input. That holds for Llama, Mistral,
    Qwen2 and most decoders in transformers 5, but not for every architecture: verify it
    once, on a few tokens, instead of training on wrong log-probs."""
    base = _unwrap(model)
    with torch.no_grad():
        out = model(input_ids=input_ids[:1, :8], use_cache=False, output_hidden_states=True, logits_to_keep=1)
        ours = head_logits(out.hidden_states[-1][:, -1:], base.get_output_embeddings(),
                           *logit_transform(base.config))
    theirs = out.logits[:, -1:].float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item()):
        raise RuntimeError(
            f"orpo_plugin: {type(base).__name__} does not feed its last hidden state straight to "
            f"its LM head, so ORPO log-probs cannot be computed without full logits. Supported "
            f"and tested: Llama, Mistral, Qwen2. Use Axolotl's built-in `rl: orpo` for this model."
        )


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


class OrpoTrainer(AxolotlTrainer):
    """Built by Axolotl's RL builder (`rl: orpo_plugin`); accepts TRL-style string datasets."""

    tag_names = ["axolotl", "orpo", "orpo_plugin"]

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, orpo_settings: OrpoSettings | None = None,
                 **kwargs):
        tokenizer = processing_class
        max_length = getattr(args, "max_length", None)
        num_proc = getattr(args, "dataset_num_proc", None)
        if train_dataset is not None:
            train_dataset, dropped = tokenize_dataset(train_dataset, tokenizer, max_length, num_proc)
            if dropped:
                LOG.warning(f"ORPO: dropped {dropped} training pairs whose prompt fills sequence_len")
        if eval_dataset is not None:
            eval_dataset, dropped = tokenize_dataset(eval_dataset, tokenizer, max_length, num_proc)
            if dropped:
                LOG.warning(f"ORPO: dropped {dropped} eval pairs whose prompt fills sequence_len")
        pad_multiple = getattr(data_collator, "pad_to_multiple_of", None)
        data_collator = PairCollator(_pad_id(tokenizer), pad_to_multiple_of=pad_multiple)
        super().__init__(
            model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=tokenizer, data_collator=data_collator, **kwargs,
        )
        # Axolotl swaps collators between train and eval; both are ours.
        self.train_data_collator = self.eval_data_collator = data_collator
        alpha = getattr(args, "beta", None)
        self.orpo = orpo_settings or OrpoSettings(alpha=OrpoSettings.alpha if alpha is None else alpha)
        # compute_loss normalises by whole-step counts itself: the Trainer must not divide by
        # the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._orpo_totals = {"train": None, "eval": None}
        self._head_checked = False

    # -- loss -------------------------------------------------------------------------
    def _get_num_items_in_batch(self, batch_samples, device):
        """[NLL tokens, pairs] over the optimizer step: all micro-batches, all ranks."""
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            counts[0] += nll_target_mask(batch, self.orpo.train_on_inputs).sum()
            counts[1] += batch["input_ids"].shape[0] // 2
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._head_checked:
            check_final_hidden_state(model, inputs["input_ids"])
            self._head_checked = True
        stats = orpo_batch_stats(model, inputs, self.orpo)
        if num_items_in_batch is None:  # evaluation, or a caller outside the training loop
            nll_tokens, pairs, world = max(stats.n_nll_tokens, 1), stats.n_pairs, 1
        else:
            nll_tokens, pairs = num_items_in_batch.clamp(min=1).tolist()
            # DDP averages gradients over ranks; the counts are already global.
            world = self.accelerator.num_processes
        nll = stats.loss_nll_sum / nll_tokens if get_losses()[self.orpo.loss].include_nll else 0.0
        loss = (nll + self.orpo.alpha * stats.loss_or_sum / pairs) * world
        split = "train" if model.training else "eval"
        self._accumulate(split, stats)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- metrics ----------------------------------------------------------------------
    def _accumulate(self, split: str, stats: PairBatchStats) -> None:
        counts = stats.pair_sums.new_tensor([stats.n_pairs, stats.n_nll_tokens], dtype=torch.float64)
        nll = stats.loss_nll_sum.detach().double().reshape(1)
        row = torch.cat([stats.pair_sums.double(), counts[:1], nll, counts[1:]])
        prev = self._orpo_totals[split]
        self._orpo_totals[split] = row if prev is None else prev + row

    def orpo_metrics(self, split: str) -> dict[str, float]:
        """Metrics since the last log, reduced over ranks (every rank must call this)."""
        totals = self._orpo_totals[split]
        if totals is None:
            totals = torch.zeros(len(odds.PAIR_SUMS) + 3, dtype=torch.float64, device=self.args.device)
        self._orpo_totals[split] = None
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), reduction="sum")
        values = totals.tolist()
        sums = dict(zip(odds.PAIR_SUMS, values))
        n_pairs, nll_sum, nll_tokens = values[len(odds.PAIR_SUMS):]
        if n_pairs == 0:
            return {}
        return odds.metrics_from_sums(sums, n_pairs, nll_sum, nll_tokens, self.orpo.alpha,
                                      prefix="" if split == "train" else "eval_")

    def log(self, logs, start_time=None):
        split = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if split is not None:
            logs.update(self.orpo_metrics(split))
        return super().log(logs, start_time)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id  # padding is masked everywhere, its id never matters
