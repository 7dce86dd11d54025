"""Preference data for `rl: orpo_plugin`: read, check, normalize, tokenize, fit, report.

`type: orpo_plugin.preference` rows are read here (so a bad row is reported with its file,
line, field and reason), their format is detected among the registered formats, and each
pair is rendered with the chat template and tokenized exactly as the trainer and the
serving side expect (core.tokenize). Entries with Axolotl's own types (chat_template.argilla)
go through Axolotl's transform, then the same tokenization.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from axolotl.utils.logging import get_logger

from orpo_plugin.core.atomic import atomic_path
from orpo_plugin.core.formats import BadRow, OrpoDataError, get_formats
from orpo_plugin.core.rows import (
    JSON_SUFFIXES,
    DatasetReport,
    apply_field_map,
    detect_format,
    normalize_rows,
    present,
    read_local_rows,
)
from orpo_plugin.core.tokenize import NOTE, PAIR_COLUMNS, TRUNCATED, encode_pairs, render_prompt

LOG = get_logger(f"axolotl.{__name__}")  # Axolotl shows INFO only from axolotl.* loggers
STRATEGY_PREFIX = "orpo_plugin."
FIELD_KEYS = ("field_prompt", "field_chosen", "field_rejected", "field_system", "field_question")


def is_ours(ds_cfg) -> bool:
    return str(ds_cfg.get("type") or "").startswith(STRATEGY_PREFIX)


def split_field_maps(cfg: dict) -> None:
    """Axolotl's dataset schema drops keys it does not know, so the column mapping of our
    entries (field_prompt: ..., ...) moves to `orpo_field_maps` before validation."""
    maps = {}
    for key in ("datasets", "test_datasets"):
        entries = cfg.get(key) or []
        maps[key] = [
            {k[len("field_") :]: entry.pop(k) for k in FIELD_KEYS if k in entry}
            if isinstance(entry, dict) and is_ours(entry)
            else {}
            for entry in entries
        ]
    if any(m for ms in maps.values() for m in ms):
        cfg["orpo_field_maps"] = maps


# -- reading ----------------------------------------------------------------------------
def read_rows(ds_cfg, cfg) -> Iterator[tuple[str, dict | BadRow]]:
    """(where, row) for every row: local JSON/JSONL through the core reader (a bad line is named by
    its number), everything else (hub ids, Parquet, directories) through Axolotl's loader."""
    path = Path(str(ds_cfg["path"]))
    if path.is_file() and path.suffix in JSON_SUFFIXES:
        yield from read_local_rows(path)
        return
    for i, row in enumerate(load_with_axolotl(ds_cfg, cfg)):
        yield f"row {i}", present(row)


def load_with_axolotl(ds_cfg, cfg):
    """Hub ids, Parquet, directories...: Axolotl's loader, one split."""
    from axolotl.utils.data.shared import load_dataset_with_config

    dataset = load_dataset_with_config(ds_cfg, cfg.hf_use_auth_token, streaming=False)
    return dataset[ds_cfg.get("split") or "train"] if hasattr(dataset, "keys") else dataset


def chat_template(cfg, ds_cfg, tokenizer) -> str:
    if ds_cfg.get("chat_template") or cfg.chat_template:
        from axolotl.utils.chat_templates import get_chat_template_from_config

        return get_chat_template_from_config(cfg, ds_cfg=ds_cfg, tokenizer=tokenizer)
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise OrpoDataError(
        f"{ds_cfg['path']}: the tokenizer has no chat template; set `chat_template:` (e.g. chatml, "
        f"llama3) or `chat_template_jinja:` in the config."
    )


def tokenize_dataset(
    dataset,
    tokenizer,
    max_length: int | None,
    num_proc: int | None = None,
    template: str | None = None,
    desc: str = "ORPO: tokenizing pairs",
):
    """The one way pairs enter training: rows of prompt (rendered text, or chat messages rendered
    with `template`), chosen and rejected strings -> PAIR_COLUMNS through core.tokenize, then the
    pairs that cannot fit sequence_len dropped. Already tokenized datasets pass through.
    Returns (dataset, Counter of notes over all pairs)."""
    if all(c in dataset.column_names for c in PAIR_COLUMNS):
        return dataset, Counter()
    tokenized = dataset.map(
        encode_pairs,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=desc,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "template": template},
    )
    notes = Counter(tokenized[NOTE])
    kept = tokenized.filter(lambda n: n in ("", TRUNCATED), input_columns=NOTE, num_proc=num_proc)
    return kept.remove_columns(NOTE), notes


# -- one split --------------------------------------------------------------------------
def _ours(cfg, ds_cfg, field_map, tokenizer, report: DatasetReport):
    from datasets import Dataset

    pairs = normalize_rows(
        read_rows(ds_cfg, cfg), get_formats(), field_map, report.source, cfg.orpo_on_bad_row or "error", report
    )
    if not pairs:
        raise OrpoDataError(f"{report.source}: no usable pairs ({report.rows} rows read).")
    table = Dataset.from_dict(
        {
            "prompt": [p.prompt for p in pairs],
            "chosen": [p.chosen for p in pairs],
            "rejected": [p.rejected for p in pairs],
        }
    )
    return table, chat_template(cfg, ds_cfg, tokenizer)


def _axolotl_type(cfg, ds_cfg, index: int, tokenizer, report: DatasetReport):
    """Axolotl's own ORPO types: its transform to strings (the prompt already rendered)."""
    from axolotl.prompt_strategies.orpo import load as load_orpo

    dataset = load_with_axolotl(ds_cfg, cfg)
    transform = load_orpo(ds_cfg["type"], cfg, dataset_idx=index)
    if transform is None:
        raise OrpoDataError(
            f"{report.source}: unknown dataset type {ds_cfg['type']!r}; use "
            f"`type: orpo_plugin.preference` or one of Axolotl's ORPO types."
        )
    transform = transform[0] if isinstance(transform, tuple) else transform
    report.rows, report.format = len(dataset), str(ds_cfg["type"])
    strings = dataset.map(
        lambda row: transform(row, tokenizer=tokenizer),
        remove_columns=dataset.column_names,
        desc=f"ORPO: {ds_cfg['type']}",
    )
    return strings, None


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
            strings, template = _ours(cfg, ds_cfg, field_map, tokenizer, report)
        else:
            strings, template = _axolotl_type(cfg, ds_cfg, index, tokenizer, report)
        kept, report.notes = tokenize_dataset(
            strings,
            tokenizer,
            cfg.sequence_len,
            _num_proc(cfg, len(strings)),
            template=template,
            desc=f"ORPO: tokenizing {report.source}",
        )
        (LOG.warning if report.skipped or len(kept) < report.rows else LOG.info)(report.summary())
        if len(kept) == 0:
            raise OrpoDataError(
                f"{report.source}: every pair was dropped ({report.summary()}). "
                f"Raise sequence_len or shorten the prompts."
            )
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
    key = json.dumps(
        [
            sources,
            cfg.orpo_field_maps,
            cfg.sequence_len,
            cfg.chat_template,
            cfg.chat_template_jinja,
            cfg.orpo_on_bad_row,
            tokenizer.name_or_path,
            len(tokenizer),
            sorted(get_formats()),
            cfg.val_set_size,
            cfg.seed,
        ],
        sort_keys=True,
        default=str,
    )
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
    steps = math.ceil(len(train) * (cfg.num_epochs or 1) / cfg.batch_size)
    return TrainDatasetMeta(train_dataset=train, eval_dataset=evaluation, total_num_steps=steps)


def _save(dataset, path: Path) -> None:
    """Written whole or not at all. The cache key covers the sources (size, mtime) and every setting
    that shapes the pairs, so an existing entry is identical: every rank of a multi-process run
    prepares the same data, the first to finish names it and the others drop their copy without
    touching what a rank may be reading."""
    with atomic_path(path, keep_existing=True) as tmp:
        dataset.save_to_disk(str(tmp))


# -- Axolotl's strategy interface (`rl: orpo` with TRL's trainer) ------------------------
def preference(cfg, dataset_idx: int = 0, **kwargs):
    """`type: orpo_plugin.preference` under Axolotl's own loader: rows of any registered format
    become prompt/chosen/rejected strings. With `rl: orpo_plugin` the plugin's own pipeline
    runs instead (bad-row reporting, skip mode, exact truncation)."""
    formats = get_formats()
    entry = (cfg.datasets or [])[dataset_idx] if cfg.datasets else {}
    field_map = ((cfg.orpo_field_maps or {}).get("datasets") or [{}] * (dataset_idx + 1))[dataset_idx]

    template: list[str] = []

    def transform(sample, tokenizer=None):
        row = apply_field_map(present(sample), field_map)
        try:
            pair = detect_format(row, formats).to_pair(row)
        except BadRow as bad:
            raise OrpoDataError(f"{entry.get('path')}: {bad}") from None
        if not template:  # resolved once, on the first row
            template.append(chat_template(cfg, entry, tokenizer))
        prompt = render_prompt(tokenizer, template[0], pair.prompt)
        return {"prompt": prompt, "chosen": pair.chosen, "rejected": pair.rejected}

    return transform, {"remove_columns": "__all__"}
