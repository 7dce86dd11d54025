"""`orpo` (the project's CLI) and `axolotl merge-and-quantize` (through Axolotl's
axolotl.cli_commands entry point). Expected errors (orpo_plugin.core.errors.OrpoError, a missing
package, a file that cannot be written) print one line and exit 1; ORPO_DEBUG=1 keeps their traceback.

Every command imports what it needs when it runs, so `--help` and the GGUF commands (serve,
chat, score on a GGUF) never import torch or Axolotl."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from orpo_plugin.core.errors import OrpoError, debugging
from serve.serving import limits

DEFAULT_QUANTS = ("q8_0", "q4_k_m")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _ctrl_c_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, which these commands handle, also where the process
    started with SIGINT ignored (a job started in the background by a non-interactive shell, where
    Python keeps the inherited SIG_IGN)."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


# What a package of each extra provides, for the one line that says what to install.
EXTRA_OF = {"gguf": "serve", "llama_cpp": "serve", "fastapi": "serve", "uvicorn": "serve", "matplotlib": "serve"}
EXTRA_OF |= {name: "train" for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "axolotl")}


def one_line(err: Exception) -> click.ClickException | None:
    """The one line an expected error becomes; None for a bug (it keeps its traceback)."""
    if isinstance(err, OrpoError):
        return click.ClickException(str(err))
    if isinstance(err, ModuleNotFoundError) and err.name:
        top = err.name.split(".")[0]
        extra = EXTRA_OF.get(top)
        if extra:
            return click.ClickException(
                f"this command needs {top}, which is not installed here: pip install 'orpo-plugin[{extra}]' "
                f"(into the environment that runs it)"
            )
    return None


class OneLine:
    """A click command or group whose expected errors end in one line, once for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:
            line = None if debugging() else one_line(err)
            if line is None:
                raise
            raise line from None


class Group(OneLine, click.Group):
    pass


class Command(OneLine, click.Command):
    pass


def _held_out(files: list[str], limit: int, on_bad_row: str) -> list:
    """Up to `limit` preference pairs from these files, in order (any format training reads)."""
    from orpo_plugin.core.rows import load_pairs

    pairs = []
    for path in files:
        if len(pairs) >= limit:
            break
        pairs += load_pairs(path, on_bad_row, limit - len(pairs))
    return pairs


def _run_export(
    base, adapter, out, quants, force, threads, num_ctx, eval_pairs, eval_limit, keep_accuracy, on_bad_row, held_out=()
):
    """held_out: the pair files to use when --eval-pairs is not given (the config's test_datasets)."""
    import signal

    from serve.export.pipeline import export, report_table, stage_table
    from serve.export.preference import table as preference_table

    pairs = _held_out([eval_pairs] if eval_pairs else list(held_out), eval_limit, on_bad_row)
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: temporary files are removed on the way out
    _ctrl_c_interrupts()
    try:
        report = export(
            base,
            adapter,
            out,
            list(quants),
            force=force,
            threads=threads,
            num_ctx=num_ctx,
            progress=lambda msg: click.echo(f"orpo: {msg}", err=True),
            eval_pairs=pairs,
            keep_accuracy=keep_accuracy,
        )
    except KeyboardInterrupt:
        click.echo(
            f"orpo: interrupted; no temporary file is left in {out}, and files already complete keep their names",
            err=True,
        )
        raise click.exceptions.Exit(130) from None
    except OSError as err:  # disk full, file too large, permissions: nothing was left under a final name
        where = err.filename or out
        why = err.strerror or f"short write ({err}), is the disk full?"
        raise click.ClickException(
            f"could not write {where}: {why}; free space or pick another --out, then rerun with --force"
        ) from None
    click.echo(stage_table(report))
    click.echo(report_table(report))
    if not report["logits"]["checked"]:
        click.echo(f"orpo: logits not checked end to end: {report['logits']['why']}", err=True)
    if "models" in report["preference"]:
        click.echo(preference_table(report["preference"], report["files"]))
        if "choice" in report["preference"]:
            click.echo(f"orpo: {report['preference']['choice']}", err=True)
    else:
        click.echo(f"orpo: preference not checked: {report['preference']['why']}", err=True)
    click.echo(f"wrote {out}/ (Modelfile: FROM ./{report['modelfile']['from']}; export_report.json)")
    for line in report["failed_checks"]:
        click.echo(f"orpo: CHECK FAILED: {line}", err=True)


_on_bad_row = click.option(
    "--on-bad-row",
    type=click.Choice(["error", "skip"]),
    default="error",
    show_default=True,
    help="a row that is not a preference pair: stop, naming its file and line, or skip it",
)
_options = [
    click.option(
        "--quant",
        "quants",
        multiple=True,
        default=DEFAULT_QUANTS,
        show_default=True,
        help="GGUF type to write; repeat for several (f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, ...)",
    ),
    click.option(
        "--force",
        is_flag=True,
        help="replace the files an earlier export wrote to --out (model-<quant>.gguf, "
        "Modelfile, export_report.json); nothing else there is touched",
    ),
    click.option("--threads", type=int, default=max(1, (os.cpu_count() or 2)), show_default=True),
    click.option("--num-ctx", type=int, default=4096, show_default=True, help="num_ctx in the Modelfile"),
    click.option(
        "--eval-pairs",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="held-out preference pairs (any format training reads): preference accuracy of the merged "
        "model and of each file",
    ),
    click.option(
        "--eval-limit",
        type=click.IntRange(min=0),
        default=200,
        show_default=True,
        help="score the first N held-out pairs (0: none)",
    ),
    click.option(
        "--keep-accuracy",
        type=click.FloatRange(min=0, max=1, min_open=True),
        default=None,
        help="make the Modelfile use the smallest file that keeps this share of the merged model's "
        "preference accuracy (e.g. 0.99); needs held-out pairs",
    ),
    _on_bad_row,
]


def _with_options(fn):
    for option in reversed(_options):
        fn = option(fn)
    return fn


@click.group(cls=Group)
def main():
    """ORPO after training: export, serve, score, chat."""


@main.command("merge-and-quantize")
@click.option("--base", required=True, help="base model directory or hub id")
@click.option("--adapter", default=None, help="LoRA adapter directory (omit for a full fine-tune)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@_with_options
def merge_and_quantize(base, adapter, out, **options):
    """Merge the LoRA, write GGUF, quantize, write a Modelfile and a parity report."""
    _run_export(base, adapter, out, **options)


_threads = click.option("--n-threads", "threads", type=int, default=None, help="CPU threads [default: all cores]")
_n_ctx = click.option("--n-ctx", type=int, default=4096, show_default=True, help="context size in tokens")


def _limit(flag: str, kind, default, help: str):
    """One of `orpo serve`'s limits on requests (serve.serving.limits has the defaults)."""
    return click.option(flag, type=kind, default=default, show_default=True, help=help)


_score_batch = click.option(
    "--score-batch",
    type=click.IntRange(min=1),
    default=None,
    metavar="TOKENS",
    help="tokens of preference pairs scored per batch on a GGUF, whole pairs, every "
    "prompt once [default: 512, at most --n-ctx]",
)


@main.command("serve")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to bind (loopback by default)")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--api-key",
    default=None,
    envvar="ORPO_API_KEY",
    help="require `Authorization: Bearer KEY` on every route but /health [env: ORPO_API_KEY]",
)
@_n_ctx
@_threads
@_limit("--max-pairs", click.IntRange(min=1), limits.MAX_PAIRS, "pairs per /v1/score request")
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="also serve requests whose Host header is NAME (repeatable; '*' for any). By default only "
    "localhost names and the --host address are served, so DNS rebinding fails",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API (repeatable); no CORS by default",
)
@_limit(
    "--request-timeout",
    click.FloatRange(min=1),
    limits.REQUEST_TIMEOUT,
    'seconds a chat or completion may generate; it then ends with finish_reason "length"',
)
@_limit(
    "--read-timeout", click.FloatRange(min=0.1), limits.READ_TIMEOUT, "seconds a client has to send its request body"
)
@_score_batch
def serve(
    model,
    host,
    port,
    api_key,
    n_ctx,
    threads,
    max_pairs,
    allowed_hosts,
    cors_origins,
    request_timeout,
    read_timeout,
    score_batch,
):
    """OpenAI-compatible chat and completions, plus POST /v1/score (chosen vs rejected)."""
    import uvicorn

    from serve.serving.app import create_app

    hosts = (*limits.LOCAL_HOSTS, *([] if host in ("0.0.0.0", "::") else [host]), *allowed_hosts)
    # fmt: off
    app = create_app(model, api_key=api_key, n_ctx=n_ctx, n_threads=threads, max_pairs=max_pairs,
                     allowed_hosts=hosts, cors_origins=cors_origins, request_timeout=request_timeout,
                     read_timeout=read_timeout, score_batch=score_batch)
    # fmt: on
    if n_ctx > app.state.trained_context > 0:
        click.echo(
            f"orpo: warning: --n-ctx {n_ctx} is more than the {app.state.trained_context} tokens {model} was "
            f"trained on; past that its answers degrade (pass --n-ctx {app.state.trained_context})",
            err=True,
        )
    click.echo(
        f"orpo: serving {model} on http://{host}:{port} (OpenAI API under /v1, scoring at /v1/score, GET /health)",
        err=True,
    )
    # On SIGTERM or Ctrl-C, requests still running after 1 s are cancelled: generations stop at their next token.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=1)


@main.command("score")
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--pairs",
    "pairs_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="preference pairs, in any dataset format training reads (JSONL or JSON)",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="write every pair's scores and the summaries as JSON",
)
@click.option("--limit", type=int, default=None, help="score the first N pairs only")
@_on_bad_row
@_n_ctx
@_threads
@_score_batch
def score(models, pairs_path, report_path, limit, on_bad_row, n_ctx, threads, score_batch):
    """Preference accuracy of each MODEL (GGUF file, HF model directory, or a LoRA adapter
    directory from `axolotl train`) on held-out pairs."""
    from orpo_plugin.core.atomic import write_json
    from orpo_plugin.core.rows import load_pairs
    from serve.scoring import score_models, score_table

    pairs = load_pairs(pairs_path, on_bad_row, limit)
    report = score_models(list(models), pairs, n_ctx=n_ctx, threads=threads, score_batch=score_batch)
    report["pairs_file"] = str(pairs_path)
    click.echo(score_table(report))
    if report_path:
        write_json(report_path, report)
        click.echo(f"wrote {report_path}")


@main.command("chat")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@_n_ctx
@_threads
@click.option("--max-tokens", type=int, default=512, show_default=True, help="longest reply")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0 answers greedily")
@click.option("--system", default=None, help="system prompt")
def chat(model, n_ctx, threads, max_tokens, temperature, system):
    """Chat in the terminal with a GGUF, using its embedded chat template."""
    from serve.llama import check_gguf, check_version
    from serve.serving.chat import chat as run

    check_gguf(model)
    check_version()
    _ctrl_c_interrupts()
    run(model, n_ctx=n_ctx, threads=threads, max_tokens=max_tokens, temperature=temperature, system=system)


@main.command("plot")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", default=None, help="PNG path [default: OUTPUT_DIR/orpo_training.png]")
def plot(output_dir, out):
    """Plot chosen/rejected log-probs, log-odds ratio, NLL and reward accuracy over steps."""
    from serve.plot import plot as draw

    click.echo(f"wrote {draw(output_dir, out)}")


@click.command("merge-and-quantize", cls=Command)
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, help="output directory [default: OUTPUT_DIR/gguf]")
@_with_options
def axolotl_merge_and_quantize(config, out, quants, **options):
    """Export the model an Axolotl config trained: base_model + the adapter in output_dir; its
    test_datasets (local files) are the held-out pairs unless --eval-pairs names others."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(config).read_text()) or {}
    except yaml.YAMLError as err:
        raise click.ClickException(f"{config}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(cfg, dict):
        raise click.ClickException(f"{config}: an Axolotl config is a mapping of keys (base_model: ...), not a list")
    missing = [k for k in ("base_model", "output_dir") if not cfg.get(k)]
    if missing:
        raise click.ClickException(f"{config}: missing {', '.join(missing)}")
    output_dir = Path(cfg["output_dir"])
    adapter = output_dir if cfg.get("adapter") else None
    base = cfg["base_model"] if adapter else output_dir  # a full fine-tune saved its weights there
    if click.get_current_context().get_parameter_source("quants") is click.core.ParameterSource.DEFAULT:
        quants = _export_block_quants(config, cfg.get("export")) or quants
    _run_export(
        base,
        adapter,
        out or output_dir / "gguf",
        quants,
        **options,
        held_out=_test_dataset_files(config, cfg.get("test_datasets")),
    )


def _test_dataset_files(config, entries) -> list[str]:
    """The local files among the config's test_datasets; the others (hub datasets, directories) are
    named in one line each and left out."""
    files = []
    for i, entry in enumerate(entries or []):
        path = entry.get("path") if isinstance(entry, dict) else None
        if path and Path(path).is_file():
            files.append(path)
        else:
            click.echo(
                f"orpo: {config}: test_datasets[{i}] ({path}) is not a local file; the preference check "
                f"leaves it out (pass --eval-pairs FILE)",
                err=True,
            )
    return files


def _export_block_quants(config, block) -> list[str]:
    """The GGUF types Axolotl's own `export:` block asks for (Axolotl 0.21's `axolotl export`):
    `outtype` (f16 unless set) and each of `quantize`, so one block serves both commands."""
    if block is None:
        return []
    if not isinstance(block, dict):
        raise click.ClickException(f"{config}: export: must be a mapping (outtype, quantize), not {block!r}")
    quantize = block.get("quantize") or []
    if isinstance(quantize, str):
        quantize = quantize.split(",")
    if not isinstance(quantize, list):
        raise click.ClickException(f"{config}: export.quantize must be a list of GGUF types, e.g. [Q4_K_M, Q8_0]")
    from serve.export.pipeline import writable_types

    outtype = str(block.get("outtype") or "f16").lower()
    asked = [("outtype", "f16" if outtype == "auto" else outtype)] + [
        ("quantize", str(q).strip().lower()) for q in quantize
    ]
    for key, quant in asked:
        if quant not in writable_types():
            raise click.ClickException(
                f"{config}: export.{key}: {quant.upper()} is not a type merge-and-quantize "
                f"writes; choose from {', '.join(writable_types())}"
            )
    return list(dict.fromkeys(quant for _, quant in asked))


if __name__ == "__main__":
    sys.exit(main())
