"""Readers for labelled text files: .csv/.tsv/.jsonl/.json (optionally .gz) and `<label> <text>` lines.

Every reader returns `Examples`: the named text fields of each row and an int64 label array. Malformed
input raises DataError naming the file, the line and, where it applies, the column.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from meerkat_fl.errors import DataError
from meerkat_fl.tasks.base import ClassificationData

logger = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "jsonl", "json", "lines")
LabelDecoder = Callable[[Any], int]


@dataclass
class Examples:
    """Text fields of each row (field name -> text, stripped) and labels int64 [N]."""

    fields: list[dict[str, str]]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.fields)

    def subset(self, indices: np.ndarray) -> Examples:
        return Examples([self.fields[i] for i in indices], self.labels[indices], self.source)


def label_key(raw: Any) -> str | None:
    """Canonical lookup key of a raw label value: bools as 'true'/'false', integral numbers as digits."""
    if isinstance(raw, (bool, np.bool_)):
        return str(bool(raw)).lower()
    if isinstance(raw, numbers.Integral):
        return str(int(raw))
    if isinstance(raw, float) and raw.is_integer():
        return str(int(raw))
    if isinstance(raw, str):
        return raw.strip().lower()
    return None


def label_decoder(
    num_labels: int | None,
    names: Sequence[str] = (),
    words: Sequence[str] = (),
    overrides: Mapping[str, int] | None = None,
) -> LabelDecoder:
    """Map a raw label to its index: `overrides` first, then a label name, a label word, an integer.

    Name and word matches ignore case and surrounding spaces. With `num_labels=None` any integer >= 0
    is accepted. An unknown value raises KeyError with the accepted values (callers add the location).
    """
    table: dict[str, int] = {}
    if num_labels is not None:
        table.update({str(index): index for index in range(num_labels)})
    table.update({word.strip().lower(): index for index, word in enumerate(words)})
    table.update({name.strip().lower(): index for index, name in enumerate(names)})
    table.update({str(key).strip().lower(): index for key, index in (overrides or {}).items()})

    def decode(raw: Any) -> int:
        key = label_key(raw)
        if key is not None and key in table:
            return table[key]
        if num_labels is None and key is not None and key.isdigit():
            return int(key)
        raise KeyError(f"bad label {raw!r}; expected one of {sorted(table) or 'an integer >= 0'}")

    return decode


def file_format(path: Path) -> str:
    """Format of a file from its suffix (.gz ignored): csv, tsv, jsonl or json (a JSON array or JSON lines)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}.get(
        suffixes[-1] if suffixes else ""
    )
    if kind is None:
        raise DataError(f"{path}: unknown file type; expected .csv, .tsv, .jsonl or .json (optionally .gz)")
    return kind


def _open(path: Path, encoding: str, kind: str) -> TextIO:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    # csv wants newline=""; line formats split on "\n" only, so a stray "\r" inside text is kept
    newline = "" if kind in ("csv", "tsv") else "\n"
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding=encoding, newline=newline)
    return open(path, encoding=encoding, newline=newline)


def _json_array(path: Path, handle: TextIO) -> Iterator[tuple[str, dict]] | None:
    """The records of a file holding one JSON array (as `datasets`' "json" loader reads), or None when the
    file is JSON lines; the handle is rewound either way."""
    head = handle.read(4096).lstrip()
    handle.seek(0)
    if not head.startswith("["):
        return None
    try:
        records = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path}: expected a JSON array of objects")
    return ((f"record {number}", record) for number, record in enumerate(records, start=1))


def _rows(path: Path, kind: str, handle: TextIO, columns: Sequence[str] | None) -> Iterator[tuple[str, dict]]:
    """Yield (where, raw row dict) for every non-blank record of an open file; `where` is "line N" or, in a
    JSON array, "record N"."""
    array = _json_array(path, handle) if kind == "json" else None
    if array is not None:
        yield from array
    elif kind in ("jsonl", "json"):
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            yield f"line {number}", record
    elif kind == "lines":
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            label, _, text = line.strip().partition(" ")
            yield f"line {number}", {"label": label, "text": text}
    else:
        # GLUE-style TSVs carry bare quotes inside text, so TSV is read without quoting
        if kind == "csv":
            reader = csv.reader(handle, delimiter=",", quoting=csv.QUOTE_MINIMAL)
        else:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(columns) if columns is not None else None
        try:
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                if header is None:
                    header = [cell.strip() for cell in cells]
                    continue
                if len(cells) != len(header):
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(cells)} columns, "
                        f"expected {len(header)} ({header})"
                    )
                yield f"line {reader.line_num}", dict(zip(header, cells, strict=True))
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: unparsable {kind.upper()} ({exc})") from None


def _lookup(record: Mapping[str, Any], key: str) -> Any:
    """record[key]; a dotted key ('target.span1_text') walks nested objects. KeyError if absent."""
    if key in record:
        return record[key]
    value: Any = record
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def read_examples(
    path: str | Path,
    fields: Mapping[str, str],
    decode: LabelDecoder,
    *,
    label_column: str = "label",
    kind: str | None = None,
    columns: Sequence[str] | None = None,
    encoding: str = "utf-8",
    drop_empty: bool = False,
) -> Examples:
    """Read a labelled text file.

    `fields` maps a file column (dotted for nested JSON keys) to the task's field name. `kind` is one
    of FORMATS (default: from the suffix); `columns` names the columns of a header-less CSV/TSV; the
    'lines' format yields columns 'label' and 'text'. A row with an empty text field is an error,
    or is skipped (and counted in the log) with `drop_empty`.
    """
    path = Path(path)
    kind = kind or file_format(path)
    if kind not in FORMATS:
        raise DataError(f"{path}: unknown format {kind!r}; expected one of {FORMATS}")
    rows: list[dict[str, str]] = []
    labels: list[int] = []
    dropped = 0
    try:
        with _open(path, encoding, kind) as handle:
            for where, record in _rows(path, kind, handle, columns):
                row: dict[str, str] = {}
                for column, field in fields.items():
                    try:
                        value = _lookup(record, column)
                    except KeyError:
                        raise DataError(f"{path}, {where}: missing column {column!r}") from None
                    if isinstance(value, (dict, list)) or value is None:
                        raise DataError(f"{path}, {where}, column {column!r}: not text ({value!r})")
                    row[field] = str(value).strip()
                empty = [column for column, field in fields.items() if not row[field]]
                if empty and drop_empty:
                    dropped += 1
                    continue
                if empty:
                    raise DataError(f"{path}, {where}, column {empty[0]!r}: empty text")
                try:
                    raw = _lookup(record, label_column)
                except KeyError:
                    raise DataError(f"{path}, {where}: missing column {label_column!r}") from None
                try:
                    labels.append(decode(raw))
                except KeyError as exc:
                    raise DataError(
                        f"{path}, {where}, column {label_column!r}: {exc.args[0]}"
                    ) from None
                rows.append(row)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot be read as {encoding} text ({exc})") from None
    if dropped:
        logger.info("%s: dropped %d rows with empty text", path, dropped)
    if not rows:
        raise DataError(f"{path}: no data rows")
    return Examples(rows, np.asarray(labels, dtype=np.int64), str(path))


def load_file(
    path: str | Path,
    text_fields: Sequence[str],
    label_field: str = "label",
    label_names: Sequence[str] | None = None,
    *,
    template: Callable[[Mapping[str, str]], str] | None = None,
) -> ClassificationData:
    """Read a .csv/.tsv (with header) or .jsonl file, optionally .gz, into prompts and labels.

    Columns `text_fields` hold the text; `label_field` holds an int or, with `label_names`, a name.
    Prompts are `template(fields)`, or the text fields joined by newlines without a template.
    """
    names = tuple(label_names or ())
    decode = label_decoder(len(names) if names else None, names)
    examples = read_examples(path, {field: field for field in text_fields}, decode, label_column=label_field)
    if template is None:
        prompts = ["\n".join(row[field] for field in text_fields) for row in examples.fields]
    else:
        prompts = [template(row) for row in examples.fields]
    return ClassificationData(prompts, examples.labels, examples.source)
