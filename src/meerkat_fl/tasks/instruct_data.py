"""Instruction data: rows of (instruction, context, response, category) read from local files or the hub.

Files are .jsonl or .csv/.tsv (optionally .gz) with the columns of Dolly (instruction, context, response,
category); Alpaca's (instruction, input, output) map onto them by a column mapping. A missing instruction or
response column, bytes that are not the file's encoding or malformed JSON/CSV raise DataError naming the file
and line; a row whose instruction or response is empty is skipped, counted, and the count logged (never a
silent drop). A category outside the task's known categories is an error naming the line.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meerkat_fl.errors import DataError
from meerkat_fl.tasks.hub import load_hub_table
from meerkat_fl.tasks.loaders import _lookup, _open, _rows, file_format

logger = logging.getLogger(__name__)

FIELDS = ("instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")  # context and category may be absent from a file
NO_CATEGORY = -1  # the partition label of a row without a category: only iid partitions apply


@dataclass
class InstructionData:
    """Raw rows of one split: the instruction, its (possibly empty) context, the reference response and the
    category index of each row (NO_CATEGORY when the data has none). `skipped` counts the rows left out and why."""

    instructions: list[str]
    contexts: list[str]
    responses: list[str]
    categories: np.ndarray  # int64 [N], index into the task's categories, or NO_CATEGORY
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.categories = np.asarray(self.categories, dtype=np.int64).reshape(-1)
        sizes = {len(self.instructions), len(self.contexts), len(self.responses), len(self.categories)}
        if len(sizes) != 1:
            raise DataError(f"{self.source}: instruction, context, response and category columns differ in length")

    def __len__(self) -> int:
        return len(self.instructions)

    @property
    def partition_labels(self) -> np.ndarray:
        """Each row's category index (NO_CATEGORY = -1 for rows without one)."""
        return self.categories

    def subset(self, indices: Sequence[int] | np.ndarray) -> InstructionData:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return InstructionData(
            [self.instructions[i] for i in index], [self.contexts[i] for i in index],
            [self.responses[i] for i in index], self.categories[index], self.source, dict(self.skipped),
        )


def column_map(overrides: Sequence[str] | Mapping[str, str] = ()) -> dict[str, str]:
    """Field -> file column: the identity, changed by "field=column" strings (e.g. "response=output")."""
    columns = {name: name for name in FIELDS}
    items = overrides.items() if isinstance(overrides, Mapping) else [_pair(item) for item in overrides]
    for name, column in items:
        if name not in FIELDS:
            raise DataError(f"task.columns: unknown field {name!r}; fields are {', '.join(FIELDS)}")
        if not column:
            raise DataError(f"task.columns: field {name!r} is mapped to an empty column name")
        columns[name] = column
    return columns


def _pair(item: str) -> tuple[str, str]:
    name, sep, column = item.partition("=")
    if not sep:
        raise DataError(f"task.columns: {item!r} is not of the form field=column (e.g. response=output)")
    return name.strip(), column.strip()


class _Collector:
    """Accumulates validated rows; the one place that decides what a row is and why it is skipped."""

    def __init__(self, source: str, categories: Sequence[str]):
        self.source = source
        self.lookup = {name.strip().lower(): index for index, name in enumerate(categories)}
        self.names = tuple(categories)
        self.rows: tuple[list[str], list[str], list[str], list[int]] = ([], [], [], [])
        self.skipped: dict[str, int] = {}

    def add(self, where: str, values: Mapping[str, Any]) -> None:
        text = {}
        for name in ("instruction", "context", "response"):
            value = values.get(name)
            if value is None and name == "context":
                value = ""
            if isinstance(value, (dict, list)) or value is None:
                raise DataError(f"{where}, field {name!r}: not text ({value!r})")
            text[name] = str(value).strip()
        for name in REQUIRED:
            if not text[name]:
                self.skipped[f"empty {name}"] = self.skipped.get(f"empty {name}", 0) + 1
                return
        category = NO_CATEGORY
        if self.names:
            raw = values.get("category")
            key = str(raw).strip().lower() if raw is not None else ""
            if key not in self.lookup:
                raise DataError(f"{where}: category {raw!r} is not one of {list(self.names)}")
            category = self.lookup[key]
        for column, value in zip(self.rows, (text["instruction"], text["context"], text["response"], category)):
            column.append(value)

    def data(self) -> InstructionData:
        if self.skipped:
            logger.warning("%s: skipped %s", self.source,
                           ", ".join(f"{count} rows with {why}" for why, count in sorted(self.skipped.items())))
        if not self.rows[0]:
            raise DataError(f"{self.source}: no usable rows (skipped: {self.skipped or 'none'})")
        return InstructionData(*self.rows, source=self.source, skipped=dict(self.skipped))


def read_instructions(
    path: str | Path, columns: Mapping[str, str], categories: Sequence[str] = (), *, encoding: str = "utf-8",
) -> InstructionData:
    """Rows of an instruction file (.jsonl, .csv or .tsv with a header, optionally .gz).

    `columns` maps each field (FIELDS) to its file column; `categories` the task's category names (empty: the
    category column is not read and every row gets NO_CATEGORY).
    """
    path = Path(path)
    kind = file_format(path)
    wanted = ["instruction", "context", "response", *(["category"] if categories else [])]
    collector = _Collector(str(path), categories)
    try:
        with _open(path, encoding, kind) as handle:
            for number, record in _rows(path, kind, handle, None):
                values: dict[str, Any] = {}
                for name in wanted:
                    try:
                        values[name] = _lookup(record, columns[name])
                    except KeyError:
                        if name in REQUIRED or (name == "category" and categories):
                            raise DataError(f"{path}, line {number}: missing column {columns[name]!r} "
                                            f"(the {name}; map another with task.columns={name}=...)") from None
                collector.add(f"{path}, line {number}", values)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot be read as {encoding} text ({exc})") from None
    return collector.data()


def read_hub_instructions(
    name: str, config: str | None, split: str, columns: Mapping[str, str], categories: Sequence[str] = ()
) -> InstructionData | str:
    """Rows of a Hugging Face dataset split, or the reason it could not be loaded (a str), as tasks/hub.py."""
    loaded = load_hub_table(name, config, split)
    if isinstance(loaded, str):
        return loaded
    table, source = loaded
    collector = _Collector(source, categories)
    for number, record in enumerate(table):
        missing = [columns[n] for n in REQUIRED if columns[n] not in record]
        if missing:
            raise DataError(f"{source}, row {number}: missing column(s) {missing}")
        collector.add(f"{source}, row {number}", {n: record.get(columns[n]) for n in FIELDS})
    return collector.data()
