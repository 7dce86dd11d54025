"""llama.cpp on the files an export wrote, in a child process: an abort there (a vocabulary llama.cpp
cannot use, a tensor it cannot read) ends the child, not the export, and becomes one line naming
the file and llama.cpp's last log line (LlamaAbort), so the report is still written with that check
marked failed.

The child is `python -m serve.export.isolated`: calls and answers are pickled, length-prefixed,
over its stdin and stdout (its own prints and llama.cpp's go to a log file, never into the
protocol). It holds at most one model."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from orpo_plugin.core.errors import OrpoError

_HEADER = struct.Struct("<Q")
LOG_LINE = re.compile(r"^[a-z_]+: ")  # llama.cpp's own log lines: "load: ...", "llama_model_load: ..."


class LlamaAbort(OrpoError, RuntimeError):
    """llama.cpp ended the child process; the message names the file and llama.cpp's last word."""


def _send(stream, value) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    size = _HEADER.unpack(header)[0]
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def last_word(log: str, status: int) -> str:
    """llama.cpp's last log line ("load: ...", "llama_model_load: ...") and the reason it stopped
    (a C++ exception's what(), a GGML_ASSERT), without the backtrace gdb may have printed."""
    # a log line llama.cpp left without its newline runs into what gdb printed next
    lines = [line.split(" warning: ")[0].split("warning: File")[0].strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    reason = next((line.split("what():", 1)[1].strip() for line in reversed(lines) if "what():" in line), None)
    reason = reason or next((line for line in reversed(lines) if "GGML_ASSERT" in line), None)
    logged = next((line for line in reversed(lines) if LOG_LINE.match(line) and line != reason), None)
    how = f"signal {-status}" if status < 0 else f"exit status {status}"
    return "; ".join(part for part in (logged, reason) if part) + f" ({how})" if logged or reason else how


class Child:
    """A child process for llama.cpp work on `path` (the file named in every error)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serve.export.isolated"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )

    def call(self, name: str, *args):
        try:
            _send(self.proc.stdin, (name, args))
            ok, value = _receive(self.proc.stdout)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.kill()
            status = self.proc.wait()
            self.log.seek(0)
            raise LlamaAbort(
                f"{self.path}: llama.cpp stopped while {name.replace('_', ' ')}: "
                f"{last_word(self.log.read().decode(errors='replace'), status)}"
            ) from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                _send(self.proc.stdin, ("exit", ()))
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self.proc.poll() is None:
            self.proc.kill()  # Ctrl-C or an error of ours: no child left behind
        self.close()


# -- the child's side ----------------------------------------------------------------------------
def _tokenize_texts(state, path: str, texts: list[str]) -> list[list[int]]:
    from serve.llama import vocabulary

    with vocabulary(path) as tokenize:
        return [tokenize(t.encode(), add_bos=True, special=True) for t in texts]


def _open(state, path: str, n_ctx: int, threads: int, n_batch: int) -> None:
    """n_batch: rows per decode, and so of llama.cpp's full-vocabulary output buffer."""
    from serve.llama import KVCache, open_gguf

    _close(state)
    state["llm"] = open_gguf(path, n_ctx=n_ctx, threads=threads, n_batch=n_batch, n_ubatch=n_batch)
    state["cache"] = KVCache(state["llm"])


def _close(state) -> None:
    if "llm" in state:
        state.pop("cache")
        state.pop("llm").close()


def _clear(state) -> None:
    state["cache"].clear()


def _decode(state, ids: list[int]):
    """Logits of every new row, float32, after the cached ones."""
    return state["cache"].decode(ids, every_row=True)


def _score(state, path: str, n_ctx: int, threads: int, pairs: list) -> list[dict]:
    from serve.scoring import open_model, score_pairs

    _close(state)
    with open_model(path, n_ctx=n_ctx, threads=threads) as (scorer, tokenizer):
        return score_pairs(scorer, tokenizer, pairs, "", progress=False)


TASKS = {
    "tokenizing": _tokenize_texts,
    "loading": _open,
    "clearing": _clear,
    "decoding": _decode,
    "scoring": _score,
}


def main() -> int:
    calls = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed, by Python or by llama.cpp, goes to the log
    sys.stdout = sys.stderr
    state: dict = {}
    while True:
        try:
            name, args = _receive(calls)
        except EOFError:
            return 0
        if name == "exit":
            _close(state)
            return 0
        try:
            answer = (True, TASKS[name](state, *args))
        except Exception as err:  # an error of ours (GGUFError, ...): raised again in the parent
            answer = (False, err if _picklable(err) else RuntimeError(f"{type(err).__name__}: {err}"))
        _send(answers, answer)


def _picklable(err: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
