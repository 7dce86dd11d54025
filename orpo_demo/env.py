"""The one offline environment for running the CLIs here: nothing is downloaded, nothing is
tracked, and Axolotl's launcher finds the `accelerate` of the running interpreter.

    python -m orpo_demo.env      # prints KEY=VALUE lines (the Makefile passes them to `env`)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_env(base: dict | None = None) -> dict:
    """base (default os.environ) with OFFLINE set and this interpreter's bin/ first on PATH."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE)
    if not env.get("PATH", "").startswith(f"{BIN}{os.pathsep}"):
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


if __name__ == "__main__":
    print("\n".join(f"{k}={v}" for k, v in OFFLINE.items()))
