"""Where a task's splits live: a file under a data directory and/or a Hugging Face dataset split.

Also small builders that keep each task's definition to a few lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FileSource:
    """One split's file under a data directory laid out like shared/data."""

    relpath: str  # relative to data_dir, e.g. "sst2/dev.tsv"
    fields: Mapping[str, str]  # file column (dotted for nested JSON) -> task text field
    kind: str | None = None  # csv | tsv | jsonl | lines; None: from the suffix
    columns: tuple[str, ...] | None = None  # column names of a header-less CSV/TSV
    label_column: str = "label"
    label_map: Mapping[str, int] | None = None  # raw label -> index, checked before names and words
    encoding: str = "utf-8"
    holdout: str | None = None  # "train" | "test": this split is that part of a seeded 70/30 split
    drop_empty: bool = False  # skip rows whose text is empty (CR has 4) instead of failing


@dataclass(frozen=True)
class HubSource:
    """One split of a Hugging Face dataset; its integer labels must be (or be mapped to) task order."""

    name: str
    config: str | None
    split: str
    fields: Mapping[str, str]  # hub column -> task text field
    label_column: str = "label"
    label_map: Mapping[str, int] | None = None


@dataclass(frozen=True)
class SplitSource:
    """Where one split can come from: a file in a data directory and/or a hub dataset."""

    file: FileSource | None = None
    hub: HubSource | None = None


def same(*fields: str) -> dict[str, str]:
    """Column -> field mapping where each column already has the task's field name."""
    return {field: field for field in fields}


def lines(relpath: str, field: str = "sentence", encoding: str = "utf-8", **options: object) -> FileSource:
    """A `<label> <text>` file whose text becomes `field`."""
    return FileSource(relpath, {"text": field}, kind="lines", encoding=encoding, **options)  # type: ignore[arg-type]


def hub_pair(
    name: str,
    config: str | None,
    fields: Mapping[str, str],
    test_split: str = "validation",
    **options: object,
) -> tuple[HubSource, HubSource]:
    """The hub's 'train' split and its evaluation split (`test_split`)."""
    train = HubSource(name, config, "train", fields, **options)  # type: ignore[arg-type]
    return train, replace(train, split=test_split)


def train_test(
    train: FileSource | None, test: FileSource | None, hub: tuple[HubSource, HubSource] | None = None
) -> dict[str, SplitSource]:
    """'train' and 'test' split sources from two files and an optional hub pair."""
    train_hub, test_hub = hub if hub else (None, None)
    return {"train": SplitSource(train, train_hub), "test": SplitSource(test, test_hub)}


def holdout(file: FileSource, hub: tuple[HubSource, HubSource] | None = None) -> dict[str, SplitSource]:
    """'train'/'test' as the two parts of a seeded 70/30 split of one file (the hub keeps its own splits)."""
    return train_test(replace(file, holdout="train"), replace(file, holdout="test"), hub)
