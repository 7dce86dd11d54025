"""Preference data for `rl: orpo_plugin`: read, check, normalize, tokenize, fit, report.

`type: orpo_plugin.preference` rows are read here (so a bad row is reported with its file,
line, field and reason), their format is detected among the registered formats, and each
pair is rendered with the chat template and tokenized exactly as the trainer and the
serving side expect (pairs.py). Entries with Axolotl's own types (chat_template.argilla)
go through Axolotl's transform, then the same tokenization.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from axolotl.utils.logging import get_logger

from orpo_plugin import plugins
from orpo_plugin.formats import REASONS, BadRow, Pair, PreferenceFormat
from orpo_plugin.pairs import TRUNCATED, drop_unfit, encode_string_pairs

LOG = get_logger(f"axolotl.{__name__}")  # Axolotl shows INFO only from axolotl.* loggers
STRATEGY_PREFIX = "orpo_plugin."
FIELD_KEYS = ("field_prompt", "field_chosen", "field_rejected", "field_system", "field_question")


class OrpoDataError(ValueError):
    """Bad input data: the message names the dataset, the row, the field and the fix."""


@dataclass
class DatasetReport:
    source: str
    format: str = ""
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        kept = self.rows - sum(self.skipped.values()) - sum(
            n for note, n in self.notes.items() if note not in ("", TRUNCATED))
        parts = [f"orpo_plugin: {self.source} [{self.format}]: {self.rows} rows -> {kept} pairs"]
        if self.skipped:
            detail = ", ".join(f"{REASONS.get(r, r)}: {n}" for r, n in sorted(self.skipped.items()))
            parts.append(f"skipped {sum(self.skipped.values())} bad rows ({detail})")
        dropped = {n: c for n, c in self.notes.items() if n not in ("", TRUNCATED)}
        if dropped:
            parts.append("dropped " + ", ".join(f"{c} ({n})" for n, c in dropped.items()))
        if self.notes.get(TRUNCATED):
            parts.append(f"truncated {self.notes[TRUNCATED]} to sequence_len")
        return "; ".join(parts)


def is_ours(ds_cfg) -> bool:
    return str(ds_cfg.get("type") or "").startswith(STRATEGY_PREFIX)


def split_field_maps(cfg: dict) -> None:
    """Axolotl's dataset schema drops keys it does not know, so the column mapping of our
    entries (field_prompt: ..., ...) moves to `orpo_field_maps` before validation."""
    maps = {}
    for key in ("datasets", "test_datasets"):
        entries = cfg.get(key) or []
        maps[key] = [
            {k[len("field_"):]: entry.pop(k) for k in FIELD_KEYS if k in entry}
            if isinstance(entry, dict) and is_ours(entry) else {}
            for entry in entries
        ]
    if any(m for ms in maps.values() for m in ms):
        cfg["orpo_field_maps"] = maps


# -- reading ----------------------------------------------------------------------------
def _local_json_rows(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
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


def read_rows(ds_cfg, cfg) -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for every row; a row that is not valid JSON comes as a BadRow."""
    path = Path(str(ds_cfg["path"]))
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        for where, row in _local_json_rows(path):
            if not isinstance(row, (dict, BadRow)):
                row = BadRow("(line)", "invalid_json", f"expected a JSON object, got {type(row).__name__}")
            yield where, row
        return
    for i, row in enumerate(load_with_axolotl(ds_cfg, cfg)):
        yield f"row {i}", present(row)


def load_with_axolotl(ds_cfg, cfg):
    """Hub ids, Parquet, directories...: Axolotl's loader, one split."""
    from axolotl.utils.data.shared import load_dataset_with_config

    dataset = load_dataset_with_config(ds_cfg, cfg.hf_use_auth_token, streaming=False)
    return dataset[ds_cfg.get("split") or "train"] if hasattr(dataset, "keys") else dataset


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


def detect_format(row: dict, formats: dict[str, PreferenceFormat], source: str) -> PreferenceFormat:
    matches = [fmt for fmt in formats.values() if fmt.detect(row)]
    if len(matches) == 1:
        return matches[0]
    shapes = "\n".join(f"  - {f.name}: {f.shape}" for f in formats.values())
    found = ", ".join(sorted(row)) or "(none)"
    if matches:
        raise OrpoDataError(
            f"{source}: the rows fit several formats ({', '.join(f.name for f in matches)}); "
            f"columns found: {found}. Rename or map the columns (field_prompt, field_chosen, "
            f"field_rejected, field_system) so that one shape applies:\n{shapes}")
    raise OrpoDataError(
        f"{source}: cannot tell the preference format; columns found: {found}. Accepted shapes:\n"
        f"{shapes}\nMap other column names in the dataset entry, e.g. field_prompt: question, "
        f"field_chosen: good, field_rejected: bad.")


def normalize_rows(rows, formats, field_map: dict, source: str, on_bad_row: str,
                   report: DatasetReport, skip_hint: str = "set `orpo_on_bad_row: skip`") -> list[Pair]:
    pairs, fmt = [], None
    for where, row in rows:
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            row = apply_field_map(row, field_map)
            fmt = fmt or detect_format(row, formats, source)
            report.format = fmt.name
            pairs.append(fmt.to_pair(row))
        except BadRow as bad:
            if on_bad_row != "skip":
                raise OrpoDataError(
                    f"{source} {where}: {bad}. Fix the row, or {skip_hint} to drop such rows (they are "
                    f"counted and reported).") from None
            report.skipped[bad.reason] += 1
    return pairs


def chat_template(cfg, ds_cfg, tokenizer) -> str:
    if ds_cfg.get("chat_template") or cfg.chat_template:
        from axolotl.utils.chat_templates import get_chat_template_from_config

        return get_chat_template_from_config(cfg, ds_cfg=ds_cfg, tokenizer=tokenizer)
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise OrpoDataError(
        f"{ds_cfg['path']}: the tokenizer has no chat template; set `chat_template:` (e.g. chatml, "
        f"llama3) or `chat_template_jinja:` in the config.")


def render_and_encode(batch, tokenizer, template: str, max_length):
    """datasets.map(batched=True) body: render each prompt with the generation prompt, then
    the same tokenization as every other path (pairs.encode_string_pairs)."""
    prompts = [render_prompt(tokenizer, template, m) for m in batch["prompt"]]
    return encode_string_pairs(dict(batch, prompt=prompts), tokenizer, max_length)


def render_prompt(tokenizer, template: str, messages: list[dict]) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as err:
        raise OrpoDataError(f"the chat template cannot render these messages ({err}); check that "
                            f"`chat_template` suits this tokenizer") from None


# -- one split --------------------------------------------------------------------------
def _ours(cfg, ds_cfg, field_map, tokenizer, report: DatasetReport):
    from datasets import Dataset

    pairs = normalize_rows(read_rows(ds_cfg, cfg), plugins.get_formats(), field_map, report.source,
                           cfg.orpo_on_bad_row or "error", report)
    if not pairs:
        raise OrpoDataError(f"{report.source}: no usable pairs ({report.rows} rows read).")
    table = Dataset.from_dict({"prompt": [p.prompt for p in pairs], "chosen": [p.chosen for p in pairs],
                               "rejected": [p.rejected for p in pairs]})
    return table.map(
        render_and_encode, batched=True, remove_columns=table.column_names, num_proc=_num_proc(cfg, len(table)),
        fn_kwargs={"tokenizer": tokenizer, "template": chat_template(cfg, ds_cfg, tokenizer),
                   "max_length": cfg.sequence_len},
        desc=f"ORPO: tokenizing {report.source}",
    )


def _axolotl_type(cfg, ds_cfg, index: int, tokenizer, report: DatasetReport):
    """Axolotl's own ORPO types: its transform to strings, then our tokenization."""
    from axolotl.prompt_strategies.orpo import load as load_orpo

    dataset = load_with_axolotl(ds_cfg, cfg)
    transform = load_orpo(ds_cfg["type"], cfg, dataset_idx=index)
    if transform is None:
        raise OrpoDataError(f"{report.source}: unknown dataset type {ds_cfg['type']!r}; use "
                            f"`type: orpo_plugin.preference` or one of Axolotl's ORPO types.")
    transform = transform[0] if isinstance(transform, tuple) else transform
    report.rows, report.format = len(dataset), str(ds_cfg["type"])
    strings = dataset.map(lambda row: transform(row, tokenizer=tokenizer), remove_columns=dataset.column_names,
                          desc=f"ORPO: {ds_cfg['type']}")
    return strings.map(encode_string_pairs, batched=True, remove_columns=strings.column_names,
                       num_proc=_num_proc(cfg, len(strings)),
                       fn_kwargs={"tokenizer": tokenizer, "max_length": cfg.sequence_len})


def _num_proc(cfg, n_rows: int) -> int | None:
    return cfg.dataset_num_proc if cfg.dataset_num_proc and n_rows >= 10_000 else None


def prepare_split(cfg, tokenizer, key: str):
    """Tokenized pairs of every entry under cfg[key] ('datasets' or 'test_datasets'), merged."""
    from datasets import concatenate_datasets

    maps = (cfg.orpo_field_maps or {}).get(key) or []
    parts = []
    for index, ds_cfg in enumerate(cfg[key]):
        report = DatasetReport(source=str(ds_cfg["path"]))
        if is_ours(ds_cfg):
            field_map = maps[index] if index < len(maps) else {}
            tokenized = _ours(cfg, ds_cfg, field_map, tokenizer, report)
        else:
            tokenized = _axolotl_type(cfg, ds_cfg, index, tokenizer, report)
        kept, report.notes = drop_unfit(tokenized)
        (LOG.warning if report.skipped or len(kept) < report.rows else LOG.info)(report.summary())
        if len(kept) == 0:
            raise OrpoDataError(f"{report.source}: every pair was dropped ({report.summary()}). "
                                f"Raise sequence_len or shorten the prompts.")
        parts.append(kept)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


# -- the load_datasets hook -------------------------------------------------------------
def _cache_dir(cfg, tokenizer) -> Path | None:
    if not cfg.dataset_prepared_path:
        return None
    sources = []
    for entry in list(cfg.datasets or []) + list(cfg.test_datasets or []):
        path = Path(str(entry["path"]))
        stat = path.stat() if path.exists() else None
        sources.append([dict(entry), stat and [stat.st_size, stat.st_mtime_ns]])
    key = json.dumps([sources, cfg.orpo_field_maps, cfg.sequence_len, cfg.chat_template, cfg.chat_template_jinja,
                      cfg.orpo_on_bad_row,
                      tokenizer.name_or_path, len(tokenizer), sorted(plugins.get_formats()), cfg.val_set_size,
                      cfg.seed], sort_keys=True, default=str)
    return Path(cfg.dataset_prepared_path) / "orpo_plugin" / hashlib.sha256(key.encode()).hexdigest()[:16]


def load_preference_data(cfg, preprocess: bool = False):
    """Axolotl's TrainDatasetMeta for `rl: orpo_plugin`."""
    from axolotl.common.datasets import TrainDatasetMeta
    from axolotl.loaders import load_tokenizer
    from datasets import load_from_disk

    tokenizer = load_tokenizer(cfg)
    cache = _cache_dir(cfg, tokenizer)
    if cache is not None and (cache / "train").exists() and not preprocess:
        LOG.info(f"orpo_plugin: loading prepared pairs from {cache}")
        train = load_from_disk(str(cache / "train"))
        evaluation = load_from_disk(str(cache / "eval")) if (cache / "eval").exists() else None
    else:
        train = prepare_split(cfg, tokenizer, "datasets")
        evaluation = prepare_split(cfg, tokenizer, "test_datasets") if cfg.test_datasets else None
        if evaluation is None and cfg.val_set_size:
            split = train.train_test_split(test_size=cfg.val_set_size, seed=cfg.seed or 42)
            train, evaluation = split["train"], split["test"]
        if cache is not None:  # eval first: an existing train/ means the cache is complete
            if evaluation is not None:
                _save(evaluation, cache / "eval")
            _save(train, cache / "train")
    steps = int(math.ceil(len(train) * (cfg.num_epochs or 1) / cfg.batch_size))
    return TrainDatasetMeta(train_dataset=train, eval_dataset=evaluation, total_num_steps=steps)


def _save(dataset, path: Path) -> None:
    """Write under a temporary name, then rename: a killed run leaves no half-written cache.
    The cache key covers the sources (size, mtime) and every setting that shapes the pairs, so
    an existing entry is identical: every rank of a multi-process run prepares the same data,
    the first rename wins and the others drop their copy without touching what a rank may be
    reading."""
    import os
    import shutil

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    dataset.save_to_disk(str(tmp))
    try:
        if not path.exists():
            tmp.rename(path)
    except OSError:
        if not path.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- Axolotl's strategy interface (`rl: orpo` with TRL's trainer) ------------------------
def preference(cfg, dataset_idx: int = 0, **kwargs):
    """`type: orpo_plugin.preference` under Axolotl's own loader: rows of any registered format
    become prompt/chosen/rejected strings. With `rl: orpo_plugin` the plugin's own pipeline
    runs instead (bad-row reporting, skip mode, exact truncation)."""
    formats = plugins.get_formats()
    entry = (cfg.datasets or [])[dataset_idx] if cfg.datasets else {}
    field_map = ((cfg.orpo_field_maps or {}).get("datasets") or [{}] * (dataset_idx + 1))[dataset_idx]

    template: list[str] = []

    def transform(sample, tokenizer=None):
        row = apply_field_map(present(sample), field_map)
        try:
            pair = detect_format(row, formats, str(entry.get("path"))).to_pair(row)
        except BadRow as bad:
            raise OrpoDataError(f"{entry.get('path')}: {bad}") from None
        if not template:  # resolved once, on the first row
            template.append(chat_template(cfg, entry, tokenizer))
        prompt = render_prompt(tokenizer, template[0], pair.prompt)
        return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}

    return transform, {"remove_columns": "__all__"}
