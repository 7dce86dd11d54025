"""`orpo plot OUTPUT_DIR`: the training curves of an ORPO run as one PNG (headless).

Reads OUTPUT_DIR/orpo_log_history.jsonl (the plugin appends to it during training), or the
newest checkpoint-*/trainer_state.json, which also covers runs of Axolotl's `rl: orpo`: TRL
logs the same metric names.
"""

from __future__ import annotations

import json
from pathlib import Path

from orpo_plugin.core.atomic import atomic_path
from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.files import LOG_HISTORY

PANELS = (  # (title, [(metric, label)])
    ("average log-prob of the answers", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("log-odds ratio z (log_odds_chosen)", [("log_odds_chosen", "z")]),
    ("NLL on the chosen answers", [("nll_loss", "nll_loss")]),
    ("reward accuracy (chosen above rejected)", [("rewards/accuracies", "accuracy")]),
)


class PlotError(OrpoError, ValueError):
    pass


def log_history(output_dir: str | Path) -> list[dict]:
    output_dir = Path(output_dir)
    ours = output_dir / LOG_HISTORY
    if ours.is_file():  # a line cut short by a killed run is skipped
        return [entry for line in ours.read_text().splitlines() if (entry := _entry(line)) is not None]
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1]))
    if states:
        return json.loads(states[-1].read_text())["log_history"]
    raise PlotError(
        f"{output_dir}: no {LOG_HISTORY} and no checkpoint-*/trainer_state.json; pass the output_dir of a training run"
    )


def _entry(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], float(h[key])) for h in history if key in h and "step" in h]
    return [s for s, _ in points], [v for _, v in points]


def plot(output_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = log_history(output_dir)
    if not any(series(history, key)[0] for _, lines in PANELS for key, _ in lines):
        raise PlotError(f"{output_dir}: the log history has no ORPO metrics (logps/chosen, ...)")
    out = Path(out) if out else Path(output_dir) / "orpo_training.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, lines) in zip(axes.flat, PANELS):
        for key, label in lines:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                steps, values = series(history, prefix + key)
                if steps:
                    ax.plot(steps, values, style, label=f"{label} ({'eval' if prefix else 'train'})")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ORPO training: {Path(output_dir).resolve().name}")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
