"""`orpo` (the project's CLI) and `axolotl merge-and-quantize` (through Axolotl's
axolotl.cli_commands entry point). Expected errors print one line and exit 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from serve.convert import ConversionError
from serve.export import ExportError, export, report_table
from serve.merge import MergeError
from serve.quantize import QuantizeError

EXPECTED = (ExportError, MergeError, ConversionError, QuantizeError)
DEFAULT_QUANTS = ("q8_0", "q4_k_m")


def _run_export(base, adapter, out, quants, force, threads, num_ctx):
    try:
        report = export(base, adapter, out, list(quants), force=force, threads=threads, num_ctx=num_ctx,
                        progress=lambda msg: click.echo(f"orpo: {msg}", err=True))
    except EXPECTED as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:  # disk full, file too large, permissions: nothing was left under a final name
        where = err.filename or out
        why = err.strerror or f"short write ({err}), is the disk full?"
        raise click.ClickException(f"could not write {where}: {why}; free space or pick another --out, "
                                   f"then rerun with --force") from None
    click.echo(report_table(report))
    click.echo(f"wrote {out}/ (Modelfile: FROM ./{report['modelfile']['from']}; export_report.json)")


_options = [
    click.option("--quant", "quants", multiple=True, default=DEFAULT_QUANTS, show_default=True,
                 help="GGUF type to write; repeat for several (f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k, ...)"),
    click.option("--force", is_flag=True, help="overwrite a non-empty output directory"),
    click.option("--threads", type=int, default=max(1, (os.cpu_count() or 2)), show_default=True),
    click.option("--num-ctx", type=int, default=4096, show_default=True, help="num_ctx in the Modelfile"),
]


def _with_options(fn):
    for option in reversed(_options):
        fn = option(fn)
    return fn


@click.group()
def main():
    """ORPO after training: export, serve, score, chat."""


@main.command("merge-and-quantize")
@click.option("--base", required=True, help="base model directory or hub id")
@click.option("--adapter", default=None, help="LoRA adapter directory (omit for a full fine-tune)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output directory")
@_with_options
def merge_and_quantize(base, adapter, out, quants, force, threads, num_ctx):
    """Merge the LoRA, write GGUF, quantize, write a Modelfile and a parity report."""
    _run_export(base, adapter, out, quants, force, threads, num_ctx)


@click.command("merge-and-quantize")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=None, help="output directory [default: OUTPUT_DIR/gguf]")
@_with_options
def axolotl_merge_and_quantize(config, out, quants, force, threads, num_ctx):
    """Export the model an Axolotl config trained: base_model + the adapter in output_dir."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text()) or {}
    missing = [k for k in ("base_model", "output_dir") if not cfg.get(k)]
    if missing:
        raise click.ClickException(f"{config}: missing {', '.join(missing)}")
    output_dir = Path(cfg["output_dir"])
    adapter = output_dir if cfg.get("adapter") else None
    base = cfg["base_model"] if adapter else output_dir  # a full fine-tune saved its weights there
    _run_export(base, adapter, out or output_dir / "gguf", quants, force, threads, num_ctx)


if __name__ == "__main__":
    sys.exit(main())
