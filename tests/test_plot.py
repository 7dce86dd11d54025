"""`orpo plot`: a PNG from the plugin's log history or from a checkpoint's trainer_state.json."""

from __future__ import annotations

import json
import subprocess

from test_cli import BIN, _env

from serve.plot import PANELS, log_history, plot

HISTORY = [
    dict(
        {
            "step": s,
            "loss": 5 - s / 10,
            "nll_loss": 4 - s / 10,
            "logps/chosen": -3 + s / 10,
            "logps/rejected": -3 - s / 10,
            "log_odds_chosen": s / 5,
            "rewards/accuracies": min(1, s / 10),
        }
    )
    for s in range(1, 11)
] + [{"step": 10, "eval_logps/chosen": -2.0, "eval_logps/rejected": -4.0}]


def test_plot_from_the_plugins_log_history(tmp_path):
    lines = [json.dumps(entry) for entry in HISTORY]
    (tmp_path / "orpo_log_history.jsonl").write_text("\n".join(lines) + '\n{"step": 11, "lo')  # cut short
    png = plot(tmp_path)
    assert png == tmp_path / "orpo_training.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.partial*"))
    assert {key for _, lines in PANELS for key, _ in lines} <= set().union(*HISTORY[:-1])


def test_plot_falls_back_to_the_newest_checkpoint_and_explains_an_empty_dir(tmp_path):
    for step, history in ((2, HISTORY[:2]), (10, HISTORY)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    # checkpoint-10 is the newest, though "checkpoint-2" sorts after it as text
    assert log_history(tmp_path) == HISTORY
    proc = subprocess.run(
        [str(BIN / "orpo"), "plot", str(tmp_path), "--out", str(tmp_path / "c.png")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and (tmp_path / "c.png").exists(), proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [str(BIN / "orpo"), "plot", str(empty)], env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1 and "no orpo_log_history.jsonl" in proc.stderr and "Traceback" not in proc.stderr
