"""Running the ORPO loss inside the training engine's forward.

The loss reads the final hidden states and applies the LM head to the scored positions only, so it
cannot be the model's own forward. Called after that forward, though, the head's weight is not
there to read under sharded engines: DeepSpeed ZeRO-3 gathers a partitioned parameter only while
its module's forward runs (outside, it is an empty tensor and its gradient is never reduced), and
FSDP2 reshards the root's parameters after the root forward (outside, the weight is a DTensor
shard). So everything the loss needs runs as the forward of the engine's own module, called through
the engine (DDP, DeepSpeedEngine, or the FSDP2 root itself): its forward hooks gather what the
loss reads, and the backward hooks they attach to the returned tensors gather it again in backward.
The same holds one level down for the head: the log-prob chunks run as one forward of the head, and
recompute in backward through the head's own forward, after ZeRO-3's backward hook on the head's
output has gathered its weight again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

T = TypeVar("T")


def run_as_forward(module: nn.Module, fn: Callable[..., T], *args, via: nn.Module | None = None) -> T:
    """Call `fn(forward, *args)` as `module`'s forward, through `via(*args)` (default: `module(*args)`),
    so the forward hooks of `module` and of everything wrapping it fire around it. `forward` is the
    module's own forward as it was (with any wrapper Accelerate installed, such as autocast), for `fn`
    to call without a second round of hooks. `fn` gets `args` as the hooks passed them on: use those
    (ZeRO-3 hangs its backward hooks on them). What `fn` returns should be tensors, or tuples of them:
    engines find the outputs to hook by walking those containers."""
    own = module.__dict__.get("forward")  # an instance-level forward: Accelerate's autocast wrapper
    forward = module.forward

    def restore() -> None:
        if own is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = own

    def redirected(*hooked_args):
        restore()
        return fn(forward, *hooked_args)

    module.forward = redirected
    try:
        return (via if via is not None else module)(*args)
    finally:
        restore()


def engine_module(model: nn.Module) -> nn.Module:
    """The module an engine wrapper holds (DDP and DeepSpeedEngine: `.module`); FSDP2 shards a
    model in place, so an FSDP2 root, like an unwrapped model, is its own."""
    return getattr(model, "module", model)
