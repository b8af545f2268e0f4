"""Rows of a Hugging Face dataset split, when the optional `datasets` package and the network allow."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from meerkat_fl.errors import DataError
from meerkat_fl.tasks.loaders import Examples, LabelDecoder

logger = logging.getLogger(__name__)


def read_hub(
    name: str,
    config: str | None,
    split: str,
    fields: Mapping[str, str],
    decode: LabelDecoder,
    label_column: str = "label",
) -> Examples | str:
    """Rows of a Hugging Face dataset split, or the reason it could not be loaded (a str).

    `datasets` is imported here so the package works without it; offline or missing data falls
    through with the reason instead of raising.
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
    source = f"hf:{name}" + (f"/{config}" if config else "") + f":{split}"
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
