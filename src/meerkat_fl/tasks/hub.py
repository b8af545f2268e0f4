"""Rows from Hugging Face `datasets`: a hub dataset split (when reachable) or a folder written by save_to_disk."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks.loaders import Examples, LabelDecoder

logger = logging.getLogger(__name__)

# The evaluation split of a saved DatasetDict, in order of preference, when the task asks for "test".
EVAL_SPLITS = {"test": ("test", "validation"), "validation": ("validation", "test")}


def parse_hub_id(text: str) -> tuple[str, str | None]:
    """"org/name" or "org/name:config" -> (name, config)."""
    name, _, config = text.strip().partition(":")
    if not name or name.count("/") > 1 or name.startswith("/") or name.endswith("/"):
        raise ConfigError(f"{text!r} is not a Hugging Face dataset id; expected org/name or org/name:config")
    return name, config or None


def table_examples(
    table: Iterable[Mapping[str, Any]],
    source: str,
    fields: Mapping[str, str],
    decode: LabelDecoder,
    label_column: str = "label",
) -> Examples:
    """Examples from rows of a `datasets` table (any iterable of dicts); DataError names the row and column."""
    rows: list[dict[str, str]] = []
    labels: list[int] = []
    for number, record in enumerate(table):
        missing = [column for column in (*fields, label_column) if column not in record]
        if missing:
            raise DataError(f"{source}, row {number}: missing column(s) {missing}")
        try:
            labels.append(decode(record[label_column]))
        except KeyError as exc:
            raise DataError(f"{source}, row {number}, column {label_column!r}: {exc.args[0]}") from None
        rows.append({field: str(record[column]).strip() for column, field in fields.items()})
    if not rows:
        raise DataError(f"{source}: no data rows")
    return Examples(rows, np.asarray(labels, dtype=np.int64), source)


def read_hub(
    name: str,
    config: str | None,
    split: str,
    fields: Mapping[str, str],
    decode: LabelDecoder,
    label_column: str = "label",
) -> Examples | str:
    """Rows of a Hugging Face dataset split, or the reason it could not be loaded (a str)."""
    loaded = load_hub_table(name, config, split)
    if isinstance(loaded, str):
        return loaded
    table, source = loaded
    return table_examples(table, source, fields, decode, label_column)


def load_hub_table(name: str, config: str | None, split: str) -> tuple[Any, str] | str:
    """(the dataset split, its source name "hf:name[/config]:split"), or the reason it could not be loaded.

    `datasets` is imported here (it is slow to import); offline or missing data falls through with the
    reason instead of raising.
    """
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        return "the `datasets` package is not installed"
    try:
        table = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, ...: all mean "not available here"
        logger.info("hub dataset %s/%s split %s unavailable: %s", name, config, split, exc)
        return f"{type(exc).__name__}: {exc}"
    return table, f"hf:{name}" + (f"/{config}" if config else "") + f":{split}"


def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_saved(
    path: str | Path, split: str, fields: Mapping[str, str], decode: LabelDecoder, label_column: str = "label"
) -> Examples:
    """Rows of a `save_to_disk` folder: a Dataset as is, or the `split` of a DatasetDict ("test" falls back to
    "validation")."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` folder needs the `datasets` package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged folder can fail in many ways; all mean "unreadable"
        raise DataError(f"{path}: not a readable `datasets` folder ({type(exc).__name__}: {exc})") from None
    source = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        found = [name for name in EVAL_SPLITS.get(split, (split,)) if name in loaded]
        if not found:
            raise DataError(f"{path}: no split {split!r} in this DatasetDict (it has {sorted(loaded)})")
        loaded, source = loaded[found[0]], f"{path}:{found[0]}"
    return table_examples(loaded, source, fields, decode, label_column)
