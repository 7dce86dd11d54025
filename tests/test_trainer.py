"""The trainer's loss, metrics and gradients against TRL (Axolotl's `rl: orpo`) and against an
independent reference; exact gradient accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import METRICS, build_trainer, load_model, loss_metrics_grads, make_cfg, pair_dataset

from orpo_plugin.trainer import OrpoSettings, OrpoTrainer


def _sharpen(model, factor: float = 25.0):
    """Random models give every answer the same average log-prob, so z ~ 1e-3 and any fp32
    summation order moves it by 1e-4 relative. Sharper logits make z O(1): a 1e-5 relative
    comparison then tests the implementation, not rounding."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(factor)
    return model


def _run(rl, model_dir, tokenizer, tmp_path, lora, **cfg):
    from axolotl.integrations.base import PluginManager

    PluginManager._instance = None
    config = make_cfg(model_dir, tmp_path / rl, rl=rl, **cfg)
    model = _sharpen(load_model(model_dir, lora=lora))
    if not lora:
        model.get_input_embeddings().weight.requires_grad_(False)  # TRL leaves it untouched too
    trainer = build_trainer(config, model, tokenizer, pair_dataset(tokenizer))
    return trainer, loss_metrics_grads(trainer, model)


def _assert_rel(got, want, rel):
    scale = want.abs().max().clamp(min=1e-12)
    assert ((got - want).abs().max() / scale).item() <= rel


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_parity_with_axolotl_rl_orpo(arch, lora, model_dirs, tokenizer, tmp_path, fresh_plugins):
    trl_trainer, (_, trl_logs, trl_grads) = _run(
        "orpo", model_dirs[arch], tokenizer, tmp_path, lora, train_on_inputs=True
    )
    our_trainer, (_, our_logs, our_grads) = _run(
        "orpo_plugin", model_dirs[arch], tokenizer, tmp_path, lora, train_on_inputs=True
    )
    assert type(trl_trainer).__name__ == "AxolotlORPOTrainer"
    assert isinstance(our_trainer, OrpoTrainer) and our_trainer.orpo.train_on_inputs
    for key in METRICS:
        assert our_logs[key] == pytest.approx(trl_logs[key], rel=1e-5, abs=1e-7), key
    assert abs(our_logs["log_odds_chosen"]) > 0.05  # z is not vanishing: the check has teeth
    assert trl_grads.keys() == our_grads.keys() and len(our_grads) > 0
    for name in trl_grads:
        _assert_rel(our_grads[name], trl_grads[name], 1e-5)


def _reference_loss(model, tokenizer, dataset, alpha):
    """ORPO from its definition, one sequence at a time with full logits, float64 odds:
    NLL over chosen response tokens only (the paper's L_SFT), token-averaged over the batch."""
    nll_sum, nll_tokens, penalties = 0.0, 0, []
    for row in dataset:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        avgs = []
        for side in ("chosen", "rejected"):
            answer = tokenizer(row[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + answer])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            token_logp = logp[torch.arange(len(prompt) - 1, ids.shape[1] - 1), ids[0, len(prompt) :]]
            avgs.append(token_logp.double().mean())
            if side == "chosen":
                nll_sum = nll_sum - token_logp.double().sum()
                nll_tokens += len(answer)
        a, b = avgs
        z = (a - torch.log(-torch.expm1(a))) - (b - torch.log(-torch.expm1(b)))
        penalties.append(-F.logsigmoid(z))
    return nll_sum / nll_tokens + alpha * torch.stack(penalties).mean()


@pytest.mark.parametrize("method", ["fused", "chunked"])
def test_response_only_nll_equals_independent_reference(method, model_dirs, tokenizer, tmp_path, fresh_plugins):
    cfg = make_cfg(
        model_dirs["llama-tied"],
        tmp_path,
        train_on_inputs=False,
        orpo_alpha=0.5,
        micro_batch_size=8,
        orpo_logprob_method=method,
        orpo_chunk_tokens=7,
    )
    model = _sharpen(load_model(model_dirs["llama-tied"], lora=True), 10)
    dataset = pair_dataset(tokenizer)
    trainer = build_trainer(cfg, model, tokenizer, dataset)
    assert trainer.orpo == OrpoSettings(alpha=0.5, train_on_inputs=False, chunk_tokens=7, logprob_method=method)
    loss, logs, grads = loss_metrics_grads(trainer, model)

    model.zero_grad()
    ref = _reference_loss(model, tokenizer, dataset, alpha=0.5)
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            _assert_rel(grads[name], p.grad, 1e-5)
    assert logs["nll_loss"] < logs["loss"]


def test_gradient_accumulation_4x1_equals_1x4(model_dirs, tokenizer, tmp_path, fresh_plugins):
    """Pairs of different lengths: a mean of per-micro-batch means would not be equal."""
    results = []
    for micro, accum in ((4, 1), (1, 4)):
        from axolotl.integrations.base import PluginManager

        PluginManager._instance = None
        # fmt: off
        cfg = make_cfg(model_dirs["llama"], tmp_path / f"{micro}x{accum}", micro_batch_size=micro,
                       gradient_accumulation_steps=accum, optimizer="sgd", learning_rate=1.0,
                       max_grad_norm=0.0, train_on_inputs=False)
        # fmt: on
        model = load_model(model_dirs["llama"], lora=True)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer, n=4))
        trainer.train()
        delta = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
        logs = next(h for h in trainer.state.log_history if "loss" in h)
        results.append((delta, logs))
    (d1, l1), (d2, l2) = results
    for key in METRICS:
        assert l2[key] == pytest.approx(l1[key], rel=1e-5, abs=1e-7), key
    for name in d1:
        _assert_rel(d2[name], d1[name], 1e-4)
    assert max(d.abs().max().item() for d in d1.values()) > 1e-4  # the step moved something


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_gradient_checkpointing_gives_the_same_step(lora, model_dirs, tokenizer, tmp_path, fresh_plugins):
    from axolotl.integrations.base import PluginManager

    deltas = []
    for checkpointing in (False, True):
        PluginManager._instance = None
        # fmt: off
        cfg = make_cfg(model_dirs["mistral"], tmp_path / str(checkpointing), optimizer="sgd",
                       learning_rate=1.0, max_grad_norm=0.0, gradient_checkpointing=checkpointing)
        # fmt: on
        model = load_model(model_dirs["mistral"], lora=lora)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer = build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer, n=4))
        trainer.train()
        assert model.is_gradient_checkpointing == checkpointing
        deltas.append({n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad})
    for name in deltas[0]:
        _assert_rel(deltas[1][name], deltas[0][name], 1e-5)


def test_architectures_whose_last_hidden_state_is_not_the_head_input_are_refused(model_dirs):
    from types import SimpleNamespace

    from orpo_plugin.trainer import check_final_hidden_state

    real = load_model(model_dirs["qwen2"], lora=False)
    ids = torch.tensor([[1, 5, 9, 2]])
    check_final_hidden_state(real, ids)  # Qwen2: hidden_states[-1] is the final-norm output

    class PreNormOutput(torch.nn.Module):
        """Reports the hidden state before the final norm, as some architectures do."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            return SimpleNamespace(logits=out.logits, hidden_states=out.hidden_states[:-2] + (out.hidden_states[-2],))

    with pytest.raises(RuntimeError, match=r"Qwen2ForCausalLM|PreNormOutput|LM head"):
        check_final_hidden_state(PreNormOutput(real), ids)


# (architecture, LoRA, packing, gradient checkpointing, train_on_inputs)
SHARING_CASES = [
    ("llama", True, True, False, False),
    ("mistral", False, False, False, True),
    ("qwen2", True, True, True, True),
    ("llama-tied", False, True, True, False),
    ("qwen3", True, True, False, False),
    ("gemma3", True, True, False, False),  # sliding-window layers (window 16) and a global one
    ("mistral-window", False, True, False, False),  # every layer slides (Mistral v0.1's sliding_window)
]


@pytest.mark.parametrize(
    "arch,lora,packing,checkpointing,on_inputs", SHARING_CASES, ids=["-".join(map(str, c)) for c in SHARING_CASES]
)
def test_prefix_sharing_equals_the_unshared_computation(
    arch, lora, packing, checkpointing, on_inputs, model_dirs, tokenizer, tmp_path, fresh_plugins
):
    from axolotl.integrations.base import PluginManager

    from orpo_plugin.collate import PairCollator, SharedPairCollator

    results = []
    for sharing in (False, True):
        PluginManager._instance = None
        cfg = make_cfg(
            model_dirs[arch],
            tmp_path / str(sharing),
            orpo_prefix_sharing=sharing,
            orpo_packing=packing,
            micro_batch_size=8,
            train_on_inputs=on_inputs,
            sequence_len=64,
        )
        model = _sharpen(load_model(model_dirs[arch], lora=lora))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer))
        assert type(trainer.data_collator) is (SharedPairCollator if sharing else PairCollator)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        rows = batch["input_ids"].shape[0]
        if not sharing:
            assert rows == 16  # chosen and rejected rows
        elif not packing:
            assert rows == 8  # one row per pair
        else:
            assert rows < 8  # several pairs per row
        results.append(loss_metrics_grads(trainer, model))
    (l0, m0, g0), (l1, m1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for key in METRICS:
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        _assert_rel(g1[name], g0[name], 1e-5)


def test_backends_without_custom_masks_fall_back_to_unshared_with_a_warning(
    model_dirs, tokenizer, tmp_path, fresh_plugins, caplog
):
    from orpo_plugin.collate import PairCollator
    from orpo_plugin.trainer import use_prefix_sharing

    model = load_model(model_dirs["llama"], lora=False)
    model.config._attn_implementation = "flash_attention_2"  # what `flash_attention: true` selects
    assert not use_prefix_sharing(OrpoSettings(prefix_sharing=None), model)  # auto: quietly unshared
    caplog.set_level("WARNING")
    assert not use_prefix_sharing(OrpoSettings(prefix_sharing=True), model)
    assert "flash_attention_2" in caplog.text and "separate rows" in caplog.text
    model.config._attn_implementation = "sdpa"
    assert use_prefix_sharing(OrpoSettings(), model) and not use_prefix_sharing(
        OrpoSettings(prefix_sharing=False), model
    )
    cfg = make_cfg(model_dirs["llama"], tmp_path, orpo_prefix_sharing=False)
    assert type(build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer)).data_collator) is PairCollator


def test_log_history_holds_each_entry_once(model_dirs, tokenizer, tmp_path, fresh_plugins):
    """configure() runs again from the plugin's post_trainer_create; the writer is added once."""
    import json

    from orpo_plugin.core.files import LOG_HISTORY
    from orpo_plugin.trainer import LogHistoryWriter

    cfg = make_cfg(model_dirs["llama"], tmp_path, max_steps=3)
    trainer = build_trainer(cfg, load_model(model_dirs["llama"], lora=True), tokenizer, pair_dataset(tokenizer))
    assert sum(isinstance(cb, LogHistoryWriter) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    lines = (tmp_path / LOG_HISTORY).read_text().splitlines()
    assert [json.loads(line) for line in lines] == trainer.state.log_history and len(lines) >= 3


def _mixed_dtype(model):
    """bf16 layers behind fp32 embeddings that hand bf16 on (as a model with upcast embeddings, or
    a quantized one, does): the first parameter's dtype is not the attention's."""
    model.to(torch.bfloat16)
    embed = model.get_input_embeddings().float()
    embed.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16))
    return model


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_prefix_sharing_on_a_model_whose_first_parameter_is_not_the_attention_dtype(
    backend, model_dirs, tokenizer, tmp_path, fresh_plugins
):
    from axolotl.integrations.base import PluginManager

    seen = []
    results = []
    for sharing in (False, True):
        PluginManager._instance = None
        cfg = make_cfg(model_dirs["llama"], tmp_path / str(sharing), orpo_prefix_sharing=sharing, micro_batch_size=8)
        model = _mixed_dtype(_sharpen(load_model(model_dirs["llama"], lora=False)))
        model.config._attn_implementation = backend
        assert model.dtype == torch.float32 and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        attention = model.model.layers[0].self_attn
        attention.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((kwargs["hidden_states"].dtype, kwargs["attention_mask"])),
            with_kwargs=True,
        )
        trainer = build_trainer(cfg, model, tokenizer, pair_dataset(tokenizer))
        results.append(loss_metrics_grads(trainer, model))
    hidden_dtype, mask = seen[-1]
    assert mask.dim() == 4 and hidden_dtype == torch.bfloat16
    if backend == "sdpa":  # a float mask must match the query's dtype in SDPA's fused GPU kernels
        assert mask.dtype == torch.bool
    (l0, m0, _), (l1, m1, _) = results
    assert l1 == pytest.approx(l0, rel=2e-2)
    assert m1["rewards/accuracies"] == m0["rewards/accuracies"]
