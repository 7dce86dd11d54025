"""Engines through the real `axolotl train --launcher torchrun` on 2 gloo CPU ranks: DDP, FSDP2 and
DeepSpeed ZeRO-1/2/3 against one process with the same global batch of 4 pairs.

The ranks run 1 pair per micro-batch with 2 accumulation steps; the reference runs 4 pairs at once.
Equal loss and metrics show the loss reduced right over micro-batches and ranks; equal weights after
two SGD steps show the engine reduced every gradient (the LM head's included: the loss reads it
outside the model's own forward, which ZeRO-3 and FSDP2 do not gather by themselves — before
engines.py both runs below failed, ZeRO-3 with a 1-D empty head weight, FSDP2 with a sharded one).

Accelerate hosts FSDP and DeepSpeed only on GPU ranks; tests/cpu_engines/sitecustomize.py lets it
on CPU ranks (the device checks only). LoRA runs start from one saved adapter with random A and B,
so both sides start equal whatever each world size seeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file
from test_cli import METRICS, _env, _log_history, _tiny_config

from orpo_demo.env import BIN

ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "cpu_engines"
TWO_RANKS = ["--launcher", "torchrun", "--", "--nproc_per_node", "2"]


def _zero(stage: int) -> dict:
    """The settings of Axolotl's deepspeed_configs/zero{1,2,3}.json (`axolotl fetch deepspeed_configs`):
    what they leave "auto" transformers fills from the Axolotl config. ZeRO-2 without overlap_comm:
    on gloo CPU ranks its overlapped reduction hung in the second step after an evaluation (with 2
    accumulation steps; 1 step, or no evaluation, passed), with our loss and without a stack of ours."""
    zero = {"stage": stage, "overlap_comm": stage != 2, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update(
            sub_group_size=0,
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=0,
            stage3_max_reuse_distance=0,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "wall_clock_breakdown": False,
    }


def _fsdp2(**config) -> dict:
    """Axolotl's FSDP2 keys, full shard of every decoder layer (the root holds embeddings and head)."""
    return {
        "fsdp_version": 2,
        "fsdp_config": {
            "state_dict_type": "FULL_STATE_DICT",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "reshard_after_forward": True,
            **config,
        },
    }


# name -> (engine keys, adapter?, plugin keys)
CASES = {
    "ddp": ({}, False, {}),
    "fsdp2": (_fsdp2(), False, {}),
    "fsdp2-lora": (_fsdp2(), True, {}),
    "zero3": ("zero3", False, {}),
    "zero3-lora-chunked-unshared": ("zero3", True, {"orpo_logprob_method": "chunked", "orpo_prefix_sharing": False}),
    "zero2": ("zero2", False, {}),
    "zero1": ("zero1", False, {}),
}


@pytest.fixture(scope="module")
def start(tmp_path_factory, tiny_default):
    """The data (4 pairs) and a LoRA adapter with random A and B on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("engines")
    data = tiny.write_jsonl(tiny.arithmetic_pairs(4, seed=5), root / "four.jsonl")
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_default / "model"))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(str(root / "adapter"))
    return {"root": root, "data": data, "adapter": root / "adapter", "tiny": tiny_default, "runs": {}}


def _run(
    start,
    name: str,
    engine,
    adapter: bool,
    plugin: dict,
    micro: int,
    accumulation: int,
    launcher: list[str],
    nodes: int = 1,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One `axolotl train`; with nodes > 1, one launcher per node (node ranks 0..nodes-1 on this
    machine), each as a user starts it on their node: the same config and paths."""
    run = start["root"] / name
    run.mkdir()
    extra = dict(plugin)
    if isinstance(engine, str):
        path = run / f"{engine}.json"
        path.write_text(json.dumps(_zero(int(engine[-1]))))
        extra["deepspeed"] = str(path)
    elif engine:
        extra.update(engine)
    if adapter:
        extra.update(
            adapter="lora",
            lora_model_dir=str(start["adapter"]),
            lora_r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            lora_target_linear=True,
        )
    else:
        extra["adapter"] = None
    data = {"path": str(start["data"]), "ds_type": "json", "type": "chat_template.argilla"}
    config = _tiny_config(
        run,
        start["tiny"],
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        max_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        eval_steps=1,
        test_datasets=[{**data, "split": "train"}],
        optimizer="sgd",
        learning_rate=0.5,
        warmup_steps=0,
        lr_scheduler="constant",
        val_set_size=0.0,
        datasets=[data],
        **extra,
    )
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    logs = [run / f"node{node}.log" for node in range(nodes)]  # files: a full pipe would stall a node
    procs = []
    for node, log in enumerate(logs):
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "axolotl"),
                        "train",
                        str(config),
                        *launcher,
                        *([f"--node_rank={node}"] if nodes > 1 else []),
                    ],
                    cwd=run,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        for proc, log in zip(procs, logs):
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log} still running after 600 s; its last output:\n{log.read_text()[-8000:]}")
            assert proc.returncode == 0, log.read_text()[-8000:]
    finally:  # a failed or hung node: no ranks left behind
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out = run / "out"
    history = {}  # step -> that step's train and eval entries, merged
    for entry in _log_history(out):
        if "loss" in entry or "eval_loss" in entry:
            history.setdefault(entry["step"], {}).update(entry)
    assert all("loss" in history[step] and "eval_loss" in history[step] for step in (1, 2)), history
    weights = load_file(str(out / ("adapter_model.safetensors" if adapter else "model.safetensors")))
    return history, weights


def _reference(start, adapter: bool, plugin: dict):
    key = json.dumps([adapter, plugin], sort_keys=True)
    if key not in start["runs"]:
        name = f"one-{len(start['runs'])}"
        start["runs"][key] = _run(
            start, name, None, adapter, plugin, micro=4, accumulation=1, launcher=["--launcher", "python"]
        )
    return start["runs"][key]


def _same_logs(one: dict, two: dict) -> None:
    """Both steps: loss, every metric, the gradient norm, and eval on the same 4 pairs after each step
    (a second step and eval catch what a first step hides: ZeRO-3 checks each forward against the
    parameter order it traced on the first)."""
    assert one.keys() == two.keys()  # Axolotl also evaluates before the first step
    for step in one:
        keys = [k for k in METRICS + [f"eval_{k}" for k in METRICS] + ["grad_norm"] if k in one[step]]
        for key in keys:
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_one_process(start, case):
    engine, adapter, plugin = CASES[case]
    one, one_weights = _reference(start, adapter, plugin)
    two, two_weights = _run(start, case, engine, adapter, plugin, micro=1, accumulation=2, launcher=TWO_RANKS)
    _same_logs(one, two)
    assert one_weights.keys() == two_weights.keys()
    start_weights = (
        load_file(str(start["adapter"] / "adapter_model.safetensors"))
        if adapter
        else load_file(str(start["tiny"] / "model" / "model.safetensors"))
    )
    if adapter:  # PEFT saves without the adapter name
        start_weights = {k.replace(".default", ""): v for k, v in start_weights.items()}
    assert start_weights.keys() == one_weights.keys()
    steps = {n: one_weights[n] - start_weights[n] for n in start_weights}
    assert max(step.abs().max().item() for step in steps.values()) > 1e-3  # the step did something
    for name, step in steps.items():
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=1e-5, atol=1e-7, msg=name)
        # The update itself, to fp32 rounding of the weights (a rank's gradient left out of the
        # reduction changes it by tens of percent).
        error = (two_weights[name] - start_weights[name] - step).abs().max().item()
        assert error <= 1e-4 * step.abs().max().item() + 1e-9, (name, error, step.abs().max().item())


def test_two_nodes_zero3_equal_one_process(start):
    """The README's multi-node launch: two torchrun agents (node ranks 0 and 1, one rank each) meet at
    one address, as on two machines; both prepare the data into the shared dataset_prepared_path."""
    from orpo_demo.serving import free_port

    one, one_weights = _reference(start, False, {})
    launcher = [
        "--launcher",
        "torchrun",
        "--",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    two, two_weights = _run(start, "two-nodes", "zero3", False, {}, micro=1, accumulation=2, launcher=launcher, nodes=2)
    _same_logs(one, two)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(two_weights[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_run_as_forward_runs_inside_the_hooks_and_restores_forward():
    """fn runs between the module's pre- and post-forward hooks, on the arguments the hooks passed on,
    with the forward as it was (an instance-level wrapper, as Accelerate's autocast, included), and
    that forward is back in place afterwards, also when fn raises."""
    from torch import nn

    from orpo_plugin.engines import run_as_forward

    events = []
    head = nn.Linear(3, 2)
    head.forward = lambda x: events.append("own forward") or nn.Linear.forward(head, x)  # instance-level
    own = head.__dict__["forward"]
    head.register_forward_pre_hook(lambda module, args: events.append("pre") or (args[0] * 2,))
    head.register_forward_hook(lambda module, args, out: events.append("post"))
    x = torch.ones(1, 3)

    def fn(forward, hooked):
        events.append("fn")
        assert torch.equal(hooked, x * 2)
        return forward(hooked)

    out = run_as_forward(head, fn, x)
    assert events == ["pre", "fn", "own forward", "post"]
    torch.testing.assert_close(out, nn.Linear.forward(head, x * 2))
    assert head.__dict__["forward"] is own

    with pytest.raises(RuntimeError, match="boom"):
        run_as_forward(head, lambda forward, hooked: (_ for _ in ()).throw(RuntimeError("boom")), x)
    assert head.__dict__["forward"] is own
    plain = nn.Linear(3, 2)
    run_as_forward(plain, lambda forward, hooked: forward(hooked), x)
    assert "forward" not in plain.__dict__  # the class's forward again
