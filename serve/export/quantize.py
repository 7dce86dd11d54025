"""K-quants (and the other llama.cpp file types) through llama.cpp's own quantizer, via the
ctypes API of llama-cpp-python: one intermediate GGUF in, one quantized GGUF out.

The quantizer runs in a child process: its memory (it widens the tensor it works on to f32) is not
added to what the caller has loaded, and Ctrl-C or SIGTERM stop it at once instead of after the
minutes-long C call returns."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
from tqdm import tqdm

from orpo_plugin.core.atomic import atomic_path
from orpo_plugin.core.errors import OrpoError
from serve.export.memory import peak_rss
from serve.llama import default_threads

# Names users pass (--quant) -> llama.cpp file types. The i-quants (iq*) need an importance
# matrix and are not offered. f16/bf16/q8_0 are also written directly by serve.export.convert.
QUANT_TYPES = {
    name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")
    for name in (
        "f16",
        "bf16",
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q2_k",
        "q3_k_s",
        "q3_k_m",
        "q3_k_l",
        "q4_k_s",
        "q4_k_m",
        "q5_k_s",
        "q5_k_m",
        "q6_k",
    )
}

# Bits per weight of every type an export writes, on Llama-class models (llama.cpp's own figures,
# rounded up): the disk space check's estimate, and the precision order (more bits, more precise).
BITS = {
    "f32": 32,
    "f16": 16,
    "bf16": 16,
    "q8_0": 8.5,
    "q6_k": 6.6,
    "q5_k_m": 5.7,
    "q5_k_s": 5.6,
    "q5_1": 6.0,
    "q5_0": 5.5,
    "q4_k_m": 4.9,
    "q4_k_s": 4.6,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "q3_k_l": 4.3,
    "q3_k_m": 4.0,
    "q3_k_s": 3.5,
    "q2_k": 3.4,
}


def most_precise_first(quants) -> list[str]:
    return sorted(quants, key=lambda quant: -BITS[quant])


class QuantizeError(OrpoError, ValueError):
    pass


@contextmanager
def _bytes_written(path: Path, desc: str, enabled: bool):
    """A progress bar of the bytes llama.cpp has written so far (its quantizer has no callback)."""
    if not enabled:
        yield
        return
    done = threading.Event()

    def watch(bar):
        while not done.wait(0.2):
            bar.n = path.stat().st_size if path.exists() else 0
            bar.refresh()

    with tqdm(desc=desc, unit="B", unit_scale=True) as bar:
        thread = threading.Thread(target=watch, args=(bar,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def quantize(
    src: str | Path,
    dst: str | Path,
    quant: str,
    threads: int | None = None,
    progress: bool = False,
    stats: dict | None = None,
) -> Path:
    """Quantize src (a GGUF of f32/f16/bf16 weights) to dst as `quant` (e.g. q4_k_m, q6_k).
    Written under a temporary name and renamed: no truncated file under the final name. `stats`,
    if given, receives the quantizer's peak resident set in bytes ("peak_rss")."""
    quant = quant.lower()
    if quant not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization {quant!r}; choose from {', '.join(sorted(QUANT_TYPES))}")
    src, dst = Path(src), Path(dst)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with atomic_path(dst) as tmp, _bytes_written(tmp, f"quantize {quant}", progress), tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serve.export.quantize",
                str(src),
                str(tmp),
                quant,
                str(threads or default_threads()),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            out, _ = proc.communicate()
        except BaseException:  # Ctrl-C, SIGTERM: stop the quantizer before its file is removed
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            why = next(
                (line for line in reversed(lines) if "failed" in line),
                lines[-1] if lines else f"exit status {proc.returncode}",
            )  # llama.cpp's own reason, else its last word
            raise QuantizeError(f"llama.cpp could not quantize {src} to {quant}: {why}")
    if stats is not None:
        stats.update(json.loads(out.decode().strip().splitlines()[-1]))
    return dst


def _main(src: str, dst: str, quant: str, threads: str) -> int:
    """The child: llama_model_quantize, then its peak memory as JSON on stdout."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[quant]
    params.nthread = int(threads)
    status = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if status != 0:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
        return 1
    print(json.dumps({"peak_rss": peak_rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
