"""Rows of a preference file -> checked, normalized pairs, with a report of what was dropped.

Training (orpo_plugin.datasets) and `orpo score` read preference data through these functions, so
a file that trains is a file that scores, and a bad row is named the same way by both.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orpo_plugin.core.formats import REASONS, BadRow, OrpoDataError, Pair, PreferenceFormat, get_formats
from orpo_plugin.core.tokenize import TRUNCATED

JSON_SUFFIXES = (".jsonl", ".json")
# Other local files go through Hugging Face `datasets` (as Axolotl's loader does for training).
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class DatasetReport:
    source: str
    format: str = ""
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        dropped = {n: c for n, c in self.notes.items() if n not in ("", TRUNCATED)}
        kept = self.rows - sum(self.skipped.values()) - sum(dropped.values())
        parts = [f"orpo_plugin: {self.source} [{self.format}]: {self.rows} rows -> {kept} pairs"]
        if self.skipped:
            detail = ", ".join(f"{REASONS.get(r, r)}: {n}" for r, n in sorted(self.skipped.items()))
            parts.append(f"skipped {sum(self.skipped.values())} bad rows ({detail})")
        if dropped:
            parts.append("dropped " + ", ".join(f"{c} ({n})" for n, c in dropped.items()))
        if self.notes.get(TRUNCATED):
            parts.append(f"truncated {self.notes[TRUNCATED]} to sequence_len")
        return "; ".join(parts)


# -- reading ----------------------------------------------------------------------------
def _json_rows(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            yield f"line {err.lineno}", BadRow("(file)", "invalid_json", f"invalid JSON: {err.msg}")
            return
        for i, row in enumerate(rows):
            yield f"row {i}", row
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"row {index} (line {lineno})"
        index += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield where, BadRow("(line)", "invalid_json", f"invalid JSON: {err.msg} at column {err.colno}")
            continue
        yield where, row


def read_local_rows(path: str | Path) -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for every row of a local JSON/JSONL/Parquet/CSV/Arrow file; a row that is not a
    JSON object comes as a BadRow."""
    path = Path(path)
    if path.suffix not in JSON_SUFFIXES:
        yield from table_rows(path)
        return
    for where, row in _json_rows(path):
        if not isinstance(row, (dict, BadRow)):
            row = BadRow("(line)", "invalid_json", f"expected a JSON object, got {type(row).__name__}")
        yield where, row


def table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix not in TABLE_SUFFIXES:
        raise OrpoDataError(f"{path}: expected a .jsonl, .json, {', '.join(TABLE_SUFFIXES)} file")
    from datasets import load_dataset

    for i, row in enumerate(load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")):
        yield f"row {i}", present(row)


def present(row: dict) -> dict:
    """Arrow tables give every row every column, None where a row had none: drop those so
    shape detection sees the row's own fields."""
    return {k: v for k, v in row.items() if v is not None}


# -- checking and normalizing -----------------------------------------------------------
def apply_field_map(row: dict, field_map: dict) -> dict:
    """Rename mapped columns (field_prompt: instruction -> {"prompt": row["instruction"]})."""
    if not field_map:
        return row
    row = dict(row)
    for target, column in field_map.items():
        if column in row:
            row[target] = row.pop(column)
    return row


FIELD_MAP_HINT = (
    "map other column names in the dataset entry (field_prompt, field_chosen, field_rejected, "
    "field_system), e.g. field_prompt: question"
)


def detect_format(row: dict, formats: dict[str, PreferenceFormat]) -> PreferenceFormat:
    """The one registered format whose shape the row has; a BadRow when none or several fit."""
    matches = [fmt for fmt in formats.values() if fmt.detect(row)]
    if len(matches) == 1:
        return matches[0]
    shapes = "".join(f"\n  - {f.name}: {f.shape}" for f in formats.values())
    found = ", ".join(sorted(row)) or "(none)"
    if matches:
        raise BadRow(
            "(columns)",
            "ambiguous_format",
            f"the row fits several formats ({', '.join(f.name for f in matches)}); columns found: "
            f"{found}. Rename or {FIELD_MAP_HINT}, so that one shape applies:{shapes}\n",
        )
    raise BadRow(
        "(columns)",
        "unknown_format",
        f"cannot tell the preference format; columns found: {found}. Accepted shapes:{shapes}\n"
        f"To use other column names, {FIELD_MAP_HINT}",
    )


def normalize_rows(
    rows: Iterable[tuple[str, dict | BadRow]],
    formats: dict[str, PreferenceFormat],
    field_map: dict,
    source: str,
    on_bad_row: str,
    report: DatasetReport,
    skip_hint: str = "set `orpo_on_bad_row: skip`",
) -> list[Pair]:
    """Pairs from rows. The format is detected on the first row that has one, so a bad row,
    first or not, is one bad row: an error naming it, or (skip) counted in the report."""
    pairs, fmt = [], None
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            row = apply_field_map(row, field_map)
            if fmt is None:
                fmt = detect_format(row, formats)
                report.format = fmt.name
            pairs.append(fmt.to_pair(row))
        except BadRow as bad:
            if on_bad_row != "skip":
                raise OrpoDataError(
                    f"{source} {where}: {bad}. Fix the row, or {skip_hint} to drop such rows (they are "
                    f"counted and reported)."
                ) from None
            report.skipped[bad.reason] += 1
    return pairs


def load_pairs(
    path: str | Path, on_bad_row: str = "error", limit: int | None = None, skip_hint: str = "pass --on-bad-row skip"
) -> list[Pair]:
    """Every pair of a local preference file, in any registered format."""
    source = str(path)
    pairs = normalize_rows(
        read_local_rows(path), get_formats(), {}, source, on_bad_row, DatasetReport(source), skip_hint=skip_hint
    )
    if not pairs:
        raise OrpoDataError(f"{source}: no usable pairs")
    return pairs[:limit]
