"""Run `orpo serve` in a subprocess on a free loopback port, for the demo, benchmarks and tests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from orpo_demo.env import BIN, offline_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(model: str | Path, *args: str, env: dict | None = None, log: Path | None = None, timeout: float = 300):
    """`orpo serve MODEL ARGS` for the duration of the block; yields its base URL. Its output goes
    to `log`, or to a temporary file removed afterwards."""
    with contextlib.ExitStack() as stack:
        if log is None:
            log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orpo-serve-"))) / "serve.log"
        port = free_port()
        with Path(log).open("w") as out:
            proc = subprocess.Popen(
                [str(BIN / "orpo"), "serve", str(model), "--port", str(port), *args],
                env=env or offline_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        stack.callback(_stop, proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while not _healthy(url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"`orpo serve {model}` did not come up: {Path(log).read_text()[-3000:]}")
            time.sleep(0.2)
        yield url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
