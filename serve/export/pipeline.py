"""adapter -> GGUF files (+ K-quants) + Modelfile + export_report.json, in bounded memory and disk.

The adapter is merged into the base a tensor slice at a time while the GGUF is written
(serve.export.merge): no merged checkpoint is ever saved or held in memory. f32/f16/bf16/q8_0 are written
directly; K-quants come from llama.cpp's quantizer reading an f16 (or bf16) GGUF: the one asked for,
or a temporary one beside the outputs. serve.export.parity checks the files against the merged weights.

The output directory is shared with whatever else is there: only the files this command writes
(model-<quant>.gguf for each --quant, Modelfile, export_report.json) are created or, with --force,
replaced; each is written under a temporary name first.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from orpo_plugin.core.atomic import remove_stale, scratch_path, write_json
from orpo_plugin.core.errors import OrpoError
from orpo_plugin.core.tokenize import special_prefix
from serve.export import isolated, memory, parity, preference
from serve.export.checkpoint import CheckpointError, model_directory, parameters
from serve.export.convert import OUT_TYPES, F16RangeError, convert
from serve.export.merge import merged
from serve.export.modelfile import write_modelfile
from serve.export.quantize import BITS, QUANT_TYPES, quantize
from serve.export.vocabulary import check_tokenizer

PREFERRED_FOR_MODELFILE = ("q4_k_m", "q5_k_m", "q8_0", "f16")
OWN_FILES = ("Modelfile", "export_report.json")
INTERMEDIATE = ".intermediate.gguf"
GiB = parity.GiB


class ExportError(OrpoError, ValueError):
    pass


def target(out_dir: Path, quant: str) -> Path:
    return out_dir / f"model-{quant}.gguf"


def writable_types() -> list[str]:
    """Every GGUF type an export writes: the converter's own and the quantizer's."""
    return sorted(set(OUT_TYPES) | set(QUANT_TYPES))


def check_request(out_dir: Path, quants: list[str], force: bool, base=None, adapter=None) -> list[str]:
    quants = list(dict.fromkeys(q.lower() for q in quants))
    unknown = [q for q in quants if q not in writable_types()]
    if unknown or not quants:
        raise ExportError(
            f"unknown quantization {', '.join(unknown) or '(none)'}; choose from {', '.join(writable_types())}"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file; pass a directory")
    for what, directory in (("adapter", adapter), ("base model", base)):
        if directory and Path(directory).is_dir() and out_dir.resolve() == Path(directory).resolve():
            raise ExportError(
                f"--out {out_dir} is the {what} directory; write the export beside it, e.g. "
                f"--out {Path(directory) / 'gguf'}"
            )
    existing = [p.name for p in [target(out_dir, q) for q in quants] + [out_dir / n for n in OWN_FILES] if p.exists()]
    if existing and not force:
        raise ExportError(
            f"{out_dir} already has {', '.join(existing)} from an earlier export; pass --force to "
            f"replace them (nothing else in {out_dir} is touched)"
        )
    return quants


def _estimate(params: int, quant: str) -> int:
    return int(params * BITS[quant] / 8 * 1.05) + (16 << 20)


def check_disk(out_dir: Path, params: int, quants: list[str], intermediate: bool) -> None:
    """One line saying how much is needed, before anything is written."""
    need = {target(out_dir, q).name: _estimate(params, q) for q in quants}
    if intermediate:
        need["temporary f16 GGUF"] = _estimate(params, "f16")
    free = shutil.disk_usage(out_dir).free
    if sum(need.values()) > free:
        parts = ", ".join(f"{name} {size / GiB:.1f} GiB" for name, size in need.items())
        raise ExportError(
            f"not enough disk space in {out_dir}: the export needs about {sum(need.values()) / GiB:.1f} "
            f"GiB ({parts}) and {free / GiB:.1f} GiB is free; free some space or pick another --out"
        )


class Stages:
    """Wall time and peak memory of each stage, for the final table and the report."""

    def __init__(self, progress):
        self.progress, self.rows = progress, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        """Yields a dict; a stage whose work runs in a child process while this one waits (the
        quantizer) puts the child's peak in it. The checks' llama.cpp children run beside this
        process's own work: this process and its children are sampled together."""
        self.progress(name)
        memory.reset_peak()
        start, child = time.perf_counter(), {}
        with memory.TreePeak() as tree:
            yield child
        peak = max(memory.peak_rss(), child.get("peak_rss", 0), tree.peak)
        self.rows.append(
            {"stage": name, "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak / 2**20)}
        )


def export(
    base: str | Path,
    adapter: str | Path | None,
    out_dir: str | Path,
    quants: list[str],
    force: bool = False,
    threads: int = 2,
    num_ctx: int = 4096,
    progress=print,
    eval_pairs: list | None = None,
    keep_accuracy: float | None = None,
) -> dict:
    """eval_pairs: held-out preference pairs (core.formats.Pair) scored on the merged model and
    every file; keep_accuracy: the Modelfile then uses the smallest file keeping that share of the
    merged model's preference accuracy."""
    out_dir = Path(out_dir)
    if keep_accuracy is not None and not eval_pairs:
        raise ExportError(
            "--keep-accuracy needs held-out preference pairs: pass --eval-pairs FILE (axolotl "
            "merge-and-quantize also reads the config's test_datasets)"
        )
    quants = check_request(out_dir, quants, force, base, adapter)
    try:
        source = merged(model_directory(base), adapter)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    tokenizer = _tokenizer(source)
    check_tokenizer(tokenizer, source.tokenizer_dir)
    context = preference.preflight(tokenizer, eval_pairs, _positions(source)) if eval_pairs else None
    direct = [q for q in quants if q in OUT_TYPES]
    kquants = [q for q in quants if q not in OUT_TYPES]
    reference = next((q for q in ("f16", "bf16") if q in direct), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [target(out_dir, q).name for q in quants] + list(OWN_FILES) + [INTERMEDIATE]
    for path in remove_stale(out_dir, names):
        progress(f"removed {path.name}, left by an export that was killed")
    check_disk(out_dir, parameters(source), quants, bool(kquants) and reference is None)

    stages, files, tensors = Stages(progress), {}, {}
    with contextlib.ExitStack() as scratch:
        for quant in direct:
            errors = {}
            with stages(f"write {target(out_dir, quant).name}"):
                files[quant] = convert(source, target(out_dir, quant), quant, progress=True, errors=errors)
            tensors[quant] = parity.tensor_summary(errors, quant, "merged weights")
        if kquants:
            source_file = files.get(reference)
            if source_file is None:
                source_file, reference = _intermediate(
                    source, scratch.enter_context(scratch_path(out_dir, INTERMEDIATE)), stages, tensors
                )
            for quant in kquants:
                with stages(f"quantize {target(out_dir, quant).name} (from {reference})") as child:
                    files[quant] = quantize(
                        source_file, target(out_dir, quant), quant, threads=threads, progress=True, stats=child
                    )
            with stages(f"check K-quant tensors against the {reference} file"):
                for quant in kquants:
                    with tqdm(desc=f"check {quant}", unit="tensor") as bar:
                        errors = parity.compare_files(files[quant], source_file, bar)
                    tensors[quant] = parity.tensor_summary(
                        errors, quant, f"{reference} GGUF, 1 in {parity.SAMPLE_EVERY} row slices"
                    )
        # The merged model in transformers, built once for the logits check and the preference check.
        hf = parity.reference_model(source) if eval_pairs and parity.logits_left_out(source) is None else None
        report = _check(source, tokenizer, files, tensors, threads, stages, hf)
        written = {q: {"path": p.name, "bytes": p.stat().st_size} for q, p in files.items()}
        chosen = next((q for q in PREFERRED_FOR_MODELFILE if q in files), quants[0])
        if eval_pairs:
            with stages(f"score {len(eval_pairs)} held-out pairs on the merged model and each file"):
                report["preference"] = preference.check(
                    source, tokenizer, files, eval_pairs, threads, hf, n_ctx=context
                )
            del hf
            if keep_accuracy is not None:
                chosen, line = preference.choose(report["preference"], written, keep_accuracy)
                report["preference"].update(keep_accuracy=keep_accuracy, chosen=written[chosen]["path"], choice=line)
        else:
            report["preference"] = {
                "checked": False,
                "why": "no held-out pairs (--eval-pairs FILE, or test_datasets in the Axolotl config)",
            }
        # BOS text the template writes is a token llama.cpp and Ollama add, where the tokenizer adds one;
        # elsewhere (SmolLM2's BOS is <|im_start|>, which its template writes for every turn) it is text.
        write_modelfile(
            out_dir,
            files[chosen].name,
            tokenizer.chat_template,
            num_ctx,
            tokenizer.eos_token or "</s>",
            tokenizer.bos_token if special_prefix(tokenizer) else None,
        )
    report.update(
        {
            "base": str(base),
            "adapter": str(adapter) if adapter else None,
            "stages": stages.rows,
            "files": written,
            "modelfile": {"from": files[chosen].name},
        }
    )
    report["failed_checks"] = failures(report)
    write_json(out_dir / "export_report.json", report)
    return report


def _tokenizer(source):
    """The merged model's tokenizer (the base's or the adapter's), loaded before anything is written."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ExportError(
            f"{source.tokenizer_dir}: transformers cannot load its tokenizer ({' '.join(str(err).split())[:300]}); "
            f"the export needs tokenizer.json or tokenizer.model with tokenizer_config.json there"
        ) from None


def _positions(source) -> int | None:
    """The positions the model was built for (its config's max_position_embeddings), if it says."""
    return (source.config.get("text_config") or source.config).get("max_position_embeddings")


def _intermediate(source, path: Path, stages, tensors: dict) -> tuple[Path, str]:
    """The f16 GGUF the K-quants are made from (bf16 where a tensor exceeds f16's range)."""
    for kind in ("f16", "bf16"):
        errors = {}
        try:
            with stages(f"write a temporary {kind} GGUF for llama.cpp's quantizer"):
                convert(source, path, kind, progress=True, errors=errors)
        except F16RangeError:
            continue
        tensors[f"{kind} (temporary)"] = parity.tensor_summary(errors, kind, "merged weights")
        return path, kind
    raise AssertionError("bf16 holds every float32")


def _check(source, tokenizer, files: dict[str, Path], tensors: dict, threads: int, stages, hf=None) -> dict:
    texts = parity.sample_texts(tokenizer)
    report = {"texts": len(texts), "tensors": tensors, "models": {}}
    left_out = parity.logits_left_out(source)
    fits = left_out is None
    with stages("check tokens" + (" and logits against the merged model" if fits else "")):
        found = parity.logits(source, tokenizer, texts, files, threads, hf) if fits else {}
        for quant, path in files.items():
            model = {"tensors_ok": tensors[quant]["ok"], **found.get(quant, {})}
            try:
                model["tokens_identical"] = parity.same_tokens(path, tokenizer, texts)
            except isolated.LlamaAbort as err:
                model.update(tokens_identical=False, error=model.get("error", str(err)))
            model["ok"] = (
                "error" not in model
                and model["tokens_identical"]
                and model["tensors_ok"]
                and model.get("long", {}).get("ok", True)
            )
            report["models"][quant] = model
    report["logits"] = {"checked": True} if fits else {"checked": False, "why": left_out}
    return report


def report_table(report: dict) -> str:
    rows = [
        "| file | MiB | tokens identical | worst tensor rel. RMS error | mean KL | long sequence: worst window KL |",
        "|---|---|---|---|---|---|",
    ]
    for quant, f in report["files"].items():
        m, t = report["models"][quant], report["tensors"][quant]
        kl = long = "not checked"
        if "long" in m:
            a, b = m["long"]["worst_window"]
            kl = f"{m['mean_kl']:.2e}"
            long = (
                f"{m['long']['worst_window_kl']:.2e} at {a}-{b} "
                f"(first {parity.WINDOW}: {m['long']['first_window_kl']:.2e})"
            )
        rows.append(
            f"| {f['path']} | {f['bytes'] / 2**20:.1f} | {m['tokens_identical']} | {t['worst_rel_rms']:.2e} "
            f"({t['worst']}, vs {t['reference']}) | {kl} | {long} |"
        )
    return "\n".join(rows)


def stage_table(report: dict) -> str:
    rows = ["| stage | seconds | peak RSS MiB |", "|---|---|---|"]
    rows += [f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_mib']} |" for s in report["stages"]]
    return "\n".join(rows)


def failures(report: dict) -> list[str]:
    """One line per GGUF that does not behave like the merged model."""
    out = [
        f"{m['error']} (in the preference check)"
        for m in report["preference"].get("models", {}).values()
        if "error" in m
    ]
    for quant, m in report["models"].items():
        path, t = report["files"][quant]["path"], report["tensors"][quant]
        if "error" in m:
            out.append(m["error"])
            continue
        if not m["tokens_identical"]:
            out.append(f"{path}: llama.cpp tokenizes the sample texts differently from the model's tokenizer")
        if not t["ok"]:
            out.append(
                f"{path}: tensor {t['worst']} differs from the merged weights by {t['worst_rel_rms']:.2e} "
                f"(relative RMS), above {t['bound']:.0e} for {quant}"
            )
        if "long" in m and not m["long"]["ok"]:
            a, b = m["long"]["worst_window"]
            out.append(
                f"{path}: mean next-token KL {m['long']['mean_kl']:.2e} over a "
                f"{m['long']['tokens']}-token sequence, above {m['long']['bound']:.0e} for {quant} (worst at "
                f"positions {a}-{b}: {m['long']['worst_window_kl']:.2e}); the GGUF does not compute what the "
                f"model does there: check its RoPE scaling and attention settings"
            )
    return out
