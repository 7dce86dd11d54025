"""Preference losses, selected by the YAML key `orpo_loss`. ORPO is the built-in one; a
third party can add a variant (a SimPO- or CPO-style penalty) through the same hook."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from orpo_plugin.core import odds, registry
from orpo_plugin.core.hookspecs import hookimpl


@dataclass(frozen=True)
class PreferenceLoss:
    """L = NLL (when include_nll) + orpo_alpha * mean over pairs of penalty(chosen_avg,
    rejected_avg), where *_avg are per-token-averaged response log-probs in fp32."""

    name: str
    penalty: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    include_nll: bool = True


def orpo_penalty(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    return odds.odds_ratio_loss(odds.log_odds_ratio(chosen_avg, rejected_avg))


@hookimpl
def register_losses(register):
    register(PreferenceLoss("orpo", orpo_penalty))


get_losses = registry.registered("register_losses", __name__)
