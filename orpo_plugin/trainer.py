"""OrpoTrainer: Axolotl's trainer machinery with our own ORPO forward and loss.

L = NLL + alpha * mean_pairs softplus(-z). Per micro-batch we compute sums, and divide by
counts taken over the whole optimizer step (all gradient-accumulation micro-batches, all
ranks), so 4x1 accumulation equals 1x4 and N ranks equal one process with the same global
batch. Logits exist only at scored positions, a chunk at a time (see logprobs.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.logging import get_logger
from transformers import TrainerCallback

from orpo_plugin.collate import CHOSEN, PROMPT, REJECTED, SCORE_KEYS, PairCollator, SharedPairCollator
from orpo_plugin.compat import TrainerPrivateAPI, check_trainer_api, unwrap
from orpo_plugin.core import odds
from orpo_plugin.core.files import LOG_HISTORY
from orpo_plugin.core.tokenize import TRUNCATED
from orpo_plugin.datasets import load_preference_data, tokenize_dataset
from orpo_plugin.engines import engine_module, run_as_forward
from orpo_plugin.evaluate import evaluated_cfg
from orpo_plugin.logprobs import head_logits, logit_transform, token_logprobs
from orpo_plugin.losses import get_losses

LOG = get_logger(f"axolotl.{__name__}")  # Axolotl shows INFO only from axolotl.* loggers
_NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep: run the model without its head


@dataclass
class OrpoSettings:
    alpha: float = 0.1
    train_on_inputs: bool = False  # NLL on prompt + response (TRL's choice) instead of response only
    chunk_tokens: int | None = None
    logprob_method: str = "auto"
    loss: str = "orpo"  # a name registered through the register_losses hook
    prefix_sharing: bool | None = None  # None: on where the attention backend takes a 4-D mask
    packing: bool | None = None  # None: with prefix sharing

    @classmethod
    def from_cfg(cls, cfg) -> OrpoSettings:
        alpha = cfg.orpo_alpha if cfg.orpo_alpha is not None else cls.alpha
        return cls(
            alpha=float(alpha),
            train_on_inputs=bool(cfg.train_on_inputs),
            chunk_tokens=cfg.orpo_chunk_tokens,
            logprob_method=cfg.orpo_logprob_method or "auto",
            loss=cfg.orpo_loss or "orpo",
            prefix_sharing=cfg.orpo_prefix_sharing,
            packing=cfg.orpo_packing,
        )


@dataclass
class PairBatchStats:
    """Sums for one batch: the loss is built from them and the metrics accumulate them."""

    loss_nll_sum: torch.Tensor  # differentiable
    loss_or_sum: torch.Tensor  # differentiable
    pair_sums: torch.Tensor  # detached, odds.PAIR_SUMS order
    n_pairs: int
    n_nll_tokens: int


def nll_count(batch: dict[str, torch.Tensor], train_on_inputs: bool) -> int:
    kind = batch["score_kind"]
    return int((kind == CHOSEN).sum() + ((kind == PROMPT).sum() if train_on_inputs else 0))


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["score_pair"].max()) + 1


def _model_inputs(batch: dict[str, torch.Tensor], base) -> dict[str, torch.Tensor]:
    """The model's inputs. A prefix-shared batch carries a boolean [rows, 1, T, T] mask, which
    transformers passes to attention as it is:
    - sliding-window layers get it narrowed to their window, measured in positions (a rejected
      answer's positions restart after the prompt, as in its own row): one mask where every layer
      slides (Mistral), one per layer type where some do (Gemma 3, Qwen with sliding layers);
    - SDPA takes it boolean, whatever dtype the attention computes in (a float mask must match the
      query's dtype, which a 4-bit or mixed-dtype model need not share with its first parameter);
      eager attention adds it, so it becomes additive in the dtype the embeddings feed the layers
      (any float dtype is exact there: the sum promotes)."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        mask = _per_layer_type(mask, batch["position_ids"], base.config)
        if attention_backend(base) != "sdpa":
            dtype = base.get_input_embeddings().weight.dtype
            mask = (
                {k: _additive(m, dtype) for k, m in mask.items()} if isinstance(mask, dict) else _additive(mask, dtype)
            )
    inputs["attention_mask"] = mask
    return inputs


def _per_layer_type(mask: torch.Tensor, positions: torch.Tensor, config):
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return mask
    sliding = mask & (positions[:, None, None, :] > positions[:, None, :, None] - window)
    return sliding if layer_types is None else {"full_attention": mask, "sliding_attention": sliding}


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def attention_backend(base) -> str | None:
    return getattr(base.config, "_attn_implementation", None)


def orpo_batch_stats(model, batch: dict[str, torch.Tensor], settings: OrpoSettings) -> PairBatchStats:
    """Run the model on a collated batch (either layout) and return the pieces of the loss. The
    forward and the LM head run together as one forward of the engine's module (engines.py), so
    that ZeRO-3 and FSDP2 hold the head's weight gathered while it is read and again in backward."""
    base = unwrap(model)
    kind = batch["score_kind"]
    used = torch.ones_like(kind, dtype=torch.bool) if settings.train_on_inputs else kind != PROMPT
    row, pos, target, pair, kind = (batch[k][used] for k in SCORE_KEYS)
    scale, softcap = logit_transform(base.config)
    n_pairs = pair_count(batch)
    is_nll = kind != REJECTED  # chosen answers, and prompts when they were scored at all
    inputs = _model_inputs(batch, base)  # out here: it reads the embeddings' dtype (ZeRO-3: see logprobs.py)

    def loss_parts(forward):
        out = forward(
            **inputs,
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=_NO_LOGITS.to(batch["input_ids"].device),
        )
        hidden = out.hidden_states[-1]  # final-norm output
        del out
        logp = token_logprobs(
            hidden[row, pos],
            target,
            base.get_output_embeddings(),
            chunk_tokens=settings.chunk_tokens,
            scale=scale,
            softcap=softcap,
            method=settings.logprob_method,
        )
        avgs = []
        for side in (CHOSEN, REJECTED):
            on_side = kind == side
            total = logp.new_zeros(n_pairs).index_add(0, pair, logp * on_side)
            length = torch.bincount(pair[on_side], minlength=n_pairs).clamp(min=1)  # >= 1: EOS at least
            avgs.append(total / length)
        chosen_avg, rejected_avg = avgs
        z = odds.log_odds_ratio(chosen_avg, rejected_avg)
        return (
            -(logp * is_nll).sum(),
            get_losses()[settings.loss].penalty(chosen_avg, rejected_avg).sum(),
            odds.pair_sums(chosen_avg.detach(), rejected_avg.detach(), z.detach()),
        )

    nll_sum, or_sum, sums = run_as_forward(engine_module(model), loss_parts, via=model)
    return PairBatchStats(
        loss_nll_sum=nll_sum, loss_or_sum=or_sum, pair_sums=sums, n_pairs=n_pairs, n_nll_tokens=int(is_nll.sum())
    )


def check_final_hidden_state(model, input_ids: torch.Tensor) -> None:
    """The loss reads hidden_states[-1] as the LM head's input. That holds for Llama, Mistral,
    Qwen2 and most decoders in transformers 5, but not for every architecture: verify it
    once, on a few tokens, instead of training on wrong log-probs."""
    base = unwrap(model)

    def both_logits(forward):
        out = forward(input_ids=input_ids[:1, :8], use_cache=False, output_hidden_states=True, logits_to_keep=1)
        ours = head_logits(out.hidden_states[-1][:, -1:], base.get_output_embeddings(), *logit_transform(base.config))
        return ours, out.logits[:, -1:].float()

    with torch.no_grad():
        ours, theirs = run_as_forward(engine_module(model), both_logits, via=model)
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * theirs.abs().max().item()):
        raise RuntimeError(
            f"orpo_plugin: {type(base).__name__} does not feed its last hidden state straight to "
            f"its LM head, so ORPO log-probs cannot be computed without full logits. Supported "
            f"and tested: Llama, Mistral, Qwen2. Use Axolotl's built-in `rl: orpo` for this model."
        )


# Attention backends that apply an arbitrary 4-D mask (FlashAttention takes none; FlexAttention
# wants a BlockMask, not built here yet).
MASKABLE_ATTENTION = ("sdpa", "eager")


def use_prefix_sharing(settings: OrpoSettings, model) -> bool:
    if settings.prefix_sharing is False:
        return False
    backend = attention_backend(unwrap(model))
    if backend in MASKABLE_ATTENTION:
        return True
    if settings.prefix_sharing:  # asked for explicitly: say why it is not used
        LOG.warning(
            f"orpo_plugin: prefix sharing needs attention that takes a custom mask "
            f"({', '.join(MASKABLE_ATTENTION)}); this model uses {backend!r}, so chosen and "
            f"rejected run as separate rows (same loss, more compute)"
        )
    return False


class LogHistoryWriter(TrainerCallback):
    """OUTPUT_DIR/orpo_log_history.jsonl, one line per log entry, appended as training logs
    (what `orpo plot` reads): runs with save_strategy "no" write no trainer_state.json, and a
    cut-short run still has its curve. Appending keeps each log O(1) however long the run."""

    def _path(self, args) -> Path:
        return Path(args.output_dir) / LOG_HISTORY

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # a fresh file, holding what a resumed run already logged
            path = self._path(args)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(entry) + "\n" for entry in state.log_history))

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.log_history:
            with self._path(args).open("a") as f:
                f.write(json.dumps(state.log_history[-1]) + "\n")


class OrpoTrainer(TrainerPrivateAPI, AxolotlTrainer):
    """Built by Axolotl's RL builder (`rl: orpo_plugin`); accepts TRL-style string datasets."""

    tag_names: ClassVar[list[str]] = ["axolotl", "orpo", "orpo_plugin"]

    def __init__(
        self,
        model=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        orpo_settings: OrpoSettings | None = None,
        **kwargs,
    ):
        check_trainer_api()
        tokenizer = processing_class
        max_length = getattr(args, "max_length", None)
        num_proc = getattr(args, "dataset_num_proc", None)
        # The datasets a caller holds (Axolotl's evaluate passes them to evaluate() again) -> the split.
        given = (("train", train_dataset), ("eval", eval_dataset))
        self._split_of = {id(d): split for split, d in given if d is not None}
        self._eval_prefix = "eval"
        cfg = evaluated_cfg()
        if cfg is not None:  # `axolotl evaluate`: the pairs training read, not Axolotl's rows
            data = load_preference_data(cfg)
            train_dataset = data.train_dataset if train_dataset is not None else None
            eval_dataset = data.eval_dataset if eval_dataset is not None else None
            orpo_settings = orpo_settings or OrpoSettings.from_cfg(cfg)
        if train_dataset is not None:
            train_dataset = _tokenized(train_dataset, tokenizer, max_length, num_proc, "training")
        if eval_dataset is not None:
            eval_dataset = _tokenized(eval_dataset, tokenizer, max_length, num_proc, "eval")
        self._pairs = {"train": train_dataset, "eval": eval_dataset}
        self._pad_multiple = getattr(data_collator, "pad_to_multiple_of", None)
        data_collator = PairCollator(_pad_id(tokenizer), pad_to_multiple_of=self._pad_multiple)
        super().__init__(
            model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            data_collator=data_collator,
            **kwargs,
        )
        alpha = getattr(args, "beta", None)
        self.configure(orpo_settings or OrpoSettings(alpha=OrpoSettings.alpha if alpha is None else alpha))
        if cfg is not None:
            batches = type(self.data_collator).__name__
            LOG.info(f"orpo_plugin: evaluating the pairs training read: {self.orpo}, batches: {batches}")
        # compute_loss normalises by whole-step counts itself: the Trainer must not divide by
        # the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self._orpo_totals = {"train": None, "eval": None}
        self._head_checked = False
        self.add_callback(LogHistoryWriter())

    def configure(self, settings: OrpoSettings) -> None:
        """Apply settings and choose the batch layout (before training starts)."""
        self.orpo = settings
        pad_id = _pad_id(self.processing_class)
        if use_prefix_sharing(settings, self.model):
            collator = SharedPairCollator(
                pad_id,
                max_length=getattr(self.args, "max_length", None) or 2048,
                packing=settings.packing is not False,
                pad_to_multiple_of=self._pad_multiple,
            )
        else:
            collator = PairCollator(pad_id, pad_to_multiple_of=self._pad_multiple)
        # Axolotl swaps collators between train and eval; all are ours.
        self.data_collator = self.train_data_collator = self.eval_data_collator = collator

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Trainer.evaluate on the pairs: a dataset this trainer was built with is replaced by the
        pairs it made of it (Axolotl's `evaluate` passes its untokenized rows again); the ORPO metrics
        are logged under metric_key_prefix (Axolotl's `evaluate` asks for "train" and "eval")."""
        split = self._split_of.get(id(eval_dataset))
        if split is not None and self._pairs.get(split) is not None:
            eval_dataset = self._pairs[split]
        self._eval_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = "eval"

    # -- loss -------------------------------------------------------------------------
    def step_counts(self, batch_samples, device):
        """[NLL tokens, pairs] over the optimizer step: all micro-batches, all ranks (what
        compute_loss divides by; transformers passes it in as num_items_in_batch)."""
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            counts[0] += nll_count(batch, self.orpo.train_on_inputs)
            counts[1] += pair_count(batch)
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
        inputs = self.prepare_inputs(inputs)
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
        n_pairs, nll_sum, nll_tokens = values[len(odds.PAIR_SUMS) :]
        if n_pairs == 0:
            return {}
        prefix = "" if split == "train" else f"{self._eval_prefix}_"
        return odds.metrics_from_sums(sums, n_pairs, nll_sum, nll_tokens, self.orpo.alpha, prefix=prefix)

    def log(self, logs, start_time=None):
        split = "train" if "loss" in logs else "eval" if f"{self._eval_prefix}_loss" in logs else None
        if split is None:
            return super().log(logs, start_time)
        logs.update(self.orpo_metrics(split))
        entry = _ChosenPerplexity(logs)
        result = super().log(entry, start_time)
        logs.update(entry)  # the caller's dict holds what was logged, as with Trainer.log
        return result


class _ChosenPerplexity(dict):
    """Log entries whose `ppl` / `eval_ppl` (any `<prefix>_ppl`) is the perplexity of the chosen answers, exp(nll_loss).
    Axolotl's trainer writes exp(loss) there, and the ORPO loss is no log-likelihood."""

    def __setitem__(self, key, value):
        nll = self.get(key.replace("ppl", "nll_loss")) if key == "ppl" or key.endswith("_ppl") else None
        if nll is not None:
            value = math.exp(nll) if nll < 700 else float("inf")
        super().__setitem__(key, value)


def _tokenized(dataset, tokenizer, max_length, num_proc, split: str):
    """TRL-style string datasets (Axolotl's own ORPO strategies) through the one tokenization."""
    dataset, notes = tokenize_dataset(dataset, tokenizer, max_length, num_proc)
    dropped = sum(n for note, n in notes.items() if note not in ("", TRUNCATED))
    if dropped:
        LOG.warning(f"ORPO: dropped {dropped} {split} pairs whose prompt fills sequence_len")
    return dataset


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id  # padding is masked everywhere, its id never matters
