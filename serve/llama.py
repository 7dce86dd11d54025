"""Everything this project uses of llama-cpp-python beyond its documented API, in one module.

- Scoring decodes on the model's own context and batch (`Llama._ctx`, `Llama._batch`) to read
  logits of chosen rows only, and keeps llama-cpp-python's record of the KV cache
  (`Llama.n_tokens`, `Llama.input_ids`, which `generate` uses to reuse a cached prefix) in step
  with what is really cached.
- `Llama._requires_eval`: set after scoring, so that a generation whose prompt is exactly the
  cached tokens decodes its last token again instead of sampling from logits a score left.
- Scoring several pairs per decode recreates the Llama's context (`Llama._ctx`, `Llama._stack`,
  `Llama._model`) with `n_seq_max` sequences and a unified KV cache, which Llama's constructor
  does not take, then decodes through llama.cpp's public C API (`MultiSequence`).
- The end-of-generation token set (`llama_vocab_is_eog` on `Llama._model.vocab`).
- `LlamaModel.detokenize` / `token_to_piece` (`llama_cpp._internals`) are replaced by versions
  without a 32-byte limit per token, so chat, streaming and completions keep every token's text:
  install_fixes(), which open_gguf calls, the one way a GGUF is loaded here.
- `llama_cpp._logger`: silenced while a vocabulary is read.

INTERNALS lists them all (tests/test_layout.py checks that no other module touches them). They
are tested with the versions in TESTED_VERSIONS; any other stops with one message.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import llama_cpp
import numpy as np

from orpo_plugin.core.errors import OrpoError

TESTED_VERSIONS = ("0.3.36",)
INTERNALS = (
    "Llama._ctx",
    "Llama._batch",
    "Llama._stack",
    "Llama._model",
    "Llama._requires_eval",
    "Llama.n_tokens",
    "Llama.input_ids",
    "llama_cpp._internals.LlamaModel",
    "llama_cpp._internals.LlamaContext",
    "llama_cpp._logger",
)


class LlamaVersionError(OrpoError, RuntimeError):
    pass


def check_version() -> None:
    """Stop on an untested llama-cpp-python (its INTERNALS may have changed)."""
    if llama_cpp.__version__ not in TESTED_VERSIONS:
        raise LlamaVersionError(
            f"llama-cpp-python {llama_cpp.__version__} is not a version this project was tested with "
            f"({', '.join(TESTED_VERSIONS)}): scoring reads its internals (see serve/llama.py). Install "
            f"llama-cpp-python=={TESTED_VERSIONS[-1]}."
        )


def _piece(vocab, token: int, special: bool, buffer) -> tuple[bytes, object]:
    """A token's bytes, however long: llama_token_to_piece returns -(bytes needed) when they do not fit."""
    n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buffer, len(buffer), 0, special)
    if n < 0:
        buffer = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buffer, len(buffer), 0, special)
    return buffer.raw[:n], buffer


def _detokenize(self, tokens: list[int], special: bool = False) -> bytes:
    """LlamaModel.detokenize without its 32-byte limit (0.3.36 drops longer tokens: Llama 3 has 231,
    Qwen2.5 240, runs of spaces and dashes that code answers use). Keeps its leading-space rule."""
    out, buffer = bytearray(), ctypes.create_string_buffer(64)
    for token in tokens:
        piece, buffer = _piece(self.vocab, token, special, buffer)
        out += piece
    if tokens and tokens[0] == self.token_bos() and out[:1] == b" ":
        return bytes(out[1:])
    return bytes(out)


def _token_to_piece(self, token: int, special: bool = False) -> bytes:
    return _piece(self.vocab, token, special, ctypes.create_string_buffer(64))[0]


@functools.cache
def install_fixes() -> None:
    """Replace LlamaModel's detokenize and token_to_piece for this process (once)."""
    from llama_cpp._internals import LlamaModel

    LlamaModel.detokenize = _detokenize
    LlamaModel.token_to_piece = _token_to_piece


class GGUFError(OrpoError, ValueError):
    """A model file that is not a GGUF; the message names it and what to pass instead."""


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def check_gguf(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file; pass a .gguf written by `orpo merge-and-quantize`")
    if not is_gguf(path):
        raise GGUFError(f"{path}: not a GGUF file (no GGUF magic); pass a .gguf written by `orpo merge-and-quantize`")
    return path


def default_threads() -> int:
    """Every core (llama-cpp-python's own default is half of them)."""
    return max(1, os.cpu_count() or 1)


def settings(path: str | Path, n_ctx: int = 4096, threads: int | None = None, **extra) -> dict:
    """The keyword arguments every Llama of this project is opened with (also the server's
    ModelSettings)."""
    threads = threads or default_threads()
    return dict(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, **extra)


def open_gguf(
    path: str | Path, n_ctx: int = 4096, threads: int | None = None, sequences: int = 1, **extra
) -> llama_cpp.Llama:
    """The one way to load a GGUF with llama.cpp here. sequences > 1: its context holds that many
    sequences in one KV cache (MultiSequence decodes on them; generation uses sequence 0)."""
    check_version()
    check_gguf(path)
    install_fixes()
    llm = llama_cpp.Llama(**settings(path, n_ctx, threads, **extra))
    if sequences > 1:
        _hold_sequences(llm, sequences)
    return llm


def _hold_sequences(llm: llama_cpp.Llama, n_seq_max: int) -> None:
    """Recreate the Llama's context with n_seq_max sequences in one unified KV cache, where cells
    can belong to several sequences (an answer's sequence shares its prompt's cells). Llama takes
    neither setting; the first context is freed before the second is made."""
    from llama_cpp import _internals

    params = llm.context_params
    # llama.cpp reserves max(n_seq_max, n_batch) output rows and asserts n_seq_max <= n_batch.
    params.n_seq_max = min(n_seq_max, llama_cpp.llama_max_parallel_sequences(), llm.n_batch)
    params.kv_unified = True
    llm._ctx.close()
    llm._ctx = llm._stack.enter_context(
        contextlib.closing(_internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose))
    )
    llm.n_tokens = 0


@contextlib.contextmanager
def opened(path: str | Path, n_ctx: int = 4096, threads: int | None = None, sequences: int = 1, **extra):
    llm = open_gguf(path, n_ctx, threads, sequences, **extra)
    try:
        yield llm
    finally:
        llm.close()


@contextlib.contextmanager
def vocabulary(path: str | Path):
    """Yields tokenize(text: bytes, add_bos, special) -> ids over a GGUF's vocabulary alone: no
    weights, no context (a context over a vocabulary-only model makes llama.cpp warn about a
    training context of 0)."""
    import llama_cpp._logger

    check_version()
    check_gguf(path)
    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise GGUFError(f"{path}: llama.cpp could not read its vocabulary")
    vocab = llama_cpp.llama_model_get_vocab(model)

    def tokenize(text: bytes, add_bos: bool, special: bool) -> list[int]:
        size = len(text) + 8
        while True:
            ids = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(vocab, text, len(text), ids, size, add_bos, special)
            if n >= 0:
                return list(ids[:n])
            size = -n  # too small: llama.cpp says how many it needs

    try:
        yield tokenize
    finally:
        llama_cpp.llama_model_free(model)


class KVCache:
    """Decoding on a Llama's KV cache (sequence 0) with llama-cpp-python's view of it kept true:
    after every call, `n_tokens` and `input_ids[:n_tokens]` describe exactly the cached positions,
    also when a decode fails (then the cache is emptied), so a chat that follows reuses only cache
    that exists."""

    def __init__(self, llm: llama_cpp.Llama):
        self.llm = llm

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def clear(self) -> None:
        self.llm._ctx.kv_cache_clear()
        self.llm.n_tokens = 0
        self.llm._requires_eval = True

    def truncate(self, n: int) -> None:
        """Keep positions [0, n)."""
        if n < self.llm.n_tokens:
            self.llm._ctx.kv_cache_seq_rm(-1, n, -1)
            self.llm.n_tokens = n
            self.llm._requires_eval = True  # the last logits are no longer those of position n - 1

    def decode(self, tokens: list[int], every_row: bool) -> np.ndarray:
        """Append tokens after the cached ones; returns the logits of every new row [len, vocab],
        or of the last one [1, vocab], as float32 copies."""
        llm, rows = self.llm, []
        llm._requires_eval = True  # our logits rows are ours: a generation re-decodes its last prompt token
        try:
            for start in range(0, len(tokens), llm.n_batch):
                batch = tokens[start : start + llm.n_batch]
                llm._batch.set_batch(batch=batch, n_past=llm.n_tokens, logits_all=every_row)
                llm._ctx.decode(llm._batch)
                llm.input_ids[llm.n_tokens : llm.n_tokens + len(batch)] = batch
                llm.n_tokens += len(batch)
                n_out = len(batch) if every_row else 1
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_out * llm.n_vocab(),))
                rows.append(logits.reshape(n_out, -1).copy())
        except BaseException:
            self.clear()  # a failed decode may have cached part of a batch: trust nothing
            raise
        return np.concatenate(rows if every_row else rows[-1:])


class MultiSequence:
    """Decodes tokens of several sequences per llama_decode on a Llama opened with sequences > 1
    (llama.cpp's multi-sequence batch: a token may belong to several sequences, so a prompt decoded
    once serves every answer after it). Uses llama.cpp's C API (llama_batch_init, llama_decode,
    llama_get_logits) on the Llama's context; KVCache's record of sequence 0 is
    emptied before and after, so a chat that follows re-decodes its prompt."""

    SEQ_IDS = 2  # sequences one token can belong to: a prompt's two answers

    def __init__(self, llm: llama_cpp.Llama):
        self.llm, self.cache = llm, KVCache(llm)
        self.n_seq_max = llama_cpp.llama_n_seq_max(llm._ctx.ctx)
        self.n_batch = llm.n_batch
        self.n_vocab = llm.n_vocab()
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, self.SEQ_IDS)
        batch = self._batch
        self._token = np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))
        self._n_seq = np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))
        self._output = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))
        self._seq = [np.ctypeslib.as_array(batch.seq_id[i], shape=(self.SEQ_IDS,)) for i in range(self.n_batch)]

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None

    def __del__(self):
        with contextlib.suppress(TypeError, AttributeError):  # at interpreter exit llama_cpp may be gone
            self.close()

    def clear(self) -> None:
        """Empty the KV cache (every sequence) and llama-cpp-python's record of it."""
        self.cache.clear()

    def decode(
        self, tokens: np.ndarray, pos: np.ndarray, seqs: np.ndarray, n_seqs: np.ndarray, outputs: np.ndarray
    ) -> np.ndarray:
        """One llama_decode of at most n_batch tokens: token i at position pos[i] in sequences
        seqs[i, :n_seqs[i]]; returns the logits [outputs.sum(), vocab] (float32, a view valid until
        the next decode) of the tokens where outputs is true, in batch order."""
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"a decode takes 1 to {self.n_batch} tokens, not {n}")
        self._batch.n_tokens = n
        self._token[:n], self._pos[:n], self._n_seq[:n], self._output[:n] = tokens, pos, n_seqs, outputs
        for i in range(n):
            self._seq[i][: n_seqs[i]] = seqs[i, : n_seqs[i]]
        self.llm._requires_eval = True
        code = llama_cpp.llama_decode(self.llm._ctx.ctx, self._batch)
        if code != 0:
            self.clear()
            why = "no room in the KV cache" if code == 1 else "the batch was refused (token, position or sequence id)"
            raise RuntimeError(f"llama_decode failed ({code}) on {n} tokens: {why}")
        n_out = int(np.count_nonzero(outputs))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm._ctx.ctx), shape=(n_out, self.n_vocab))


def is_end_of_generation(llm: llama_cpp.Llama, token: int) -> bool:
    """The model's end of turn (EOS, EOT, <|im_end|>, ...: llama.cpp's end-of-generation set)."""
    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


JSON_GRAMMAR = llama_cpp.llama_grammar.JSON_GBNF  # any JSON value: response_format {"type": "json_object"}


def json_schema_grammar(schema: dict) -> str:
    """GBNF for answers that follow a JSON schema (llama-cpp-python's converter)."""
    import json

    return llama_cpp.llama_grammar.json_schema_to_gbnf(json.dumps(schema))


def grammar_error(model_path: str | Path, grammar: str) -> str | None:
    """None if llama.cpp accepts the GBNF grammar for this model, else why not. Runs in a child
    process: llama.cpp's parser returns NULL on many bad grammars (which llama-cpp-python then
    dereferences) and can crash outright on others, so it never runs in the server's process."""
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-m", "serve.llama", str(model_path)],
            input=grammar.encode(),
            capture_output=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        )
    except subprocess.TimeoutExpired:
        return "llama.cpp took over 60 s to parse it"
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return "llama.cpp's grammar parser crashed on it"
    for line in proc.stderr.decode(errors="replace").splitlines():
        for marker in ("error parsing grammar: ", "unsupported grammar, "):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return "llama.cpp could not parse it"


def _check_grammar_main(model_path: str) -> int:
    """`python -m serve.llama MODEL` < grammar: exit 0 if llama.cpp builds a sampler from it, 1 if not."""
    import sys

    grammar = sys.stdin.buffer.read()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        print("parse: the model could not be loaded", file=sys.stderr)
        return 2
    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(model), grammar, b"root")
    if not sampler:
        return 1
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_check_grammar_main(sys.argv[1]))
