"""A classification task: prompt template, verbalizer, and where each split's data can be found.

Data for a split is looked up in this order: an explicit file `path`, the task's file under
`data_dir` (a directory laid out like shared/data), the same file in the data shipped with the package
(meerkat_fl/data: the demo's subset), the Hugging Face hub (when reachable). If none works, DataError says which of the three the user can provide.
"""

from __future__ import annotations

import hashlib
import logging
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from meerkat_fl.data import BUNDLED_DATA_DIR
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks.base import (
    Batch,
    ClassificationData,
    EncodedData,
    classification_loss,
    classification_loss_tensor,
    classification_metrics,
    encode,
)
from meerkat_fl.tasks.hub import is_saved_dataset, parse_hub_id, read_hub, read_saved
from meerkat_fl.tasks.loaders import Examples, label_decoder, read_examples
from meerkat_fl.tasks.options import (
    OptionsBatch,
    OptionsData,
    encode_options,
    options_loss,
    options_loss_tensor,
    options_metrics,
)
from meerkat_fl.tasks.sources import FileSource, HubSource, SplitSource

logger = logging.getLogger(__name__)

# [choice] Tasks with only one complete labelled file (SuperGLUE val, MR, CR, Subj) are split 70/30,
# stratified by label, into train/test by a seeded hash of the row number (holdout_indices);
# the seed is fixed so every run and every client sees the same test set.
HOLDOUT_TEST_FRACTION = 0.3
HOLDOUT_SEED = 0
LOSSES = ("verbalizer", "options")


def holdout_indices(labels: np.ndarray, part: str, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of the 'train' or 'test' part of a seeded, label-stratified split.

    Within each label, rows are ranked by sha256(f"{seed}:{row}") and the first
    round(count * test_fraction) go to 'test'; the split depends only on the labels, the fraction
    and the seed (not on numpy's RNG or version).
    """
    if part not in ("train", "test"):
        raise DataError(f"holdout part must be 'train' or 'test', got {part!r}")
    chosen: list[int] = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label).tolist()
        rows.sort(key=lambda row: hashlib.sha256(f"{seed}:{row}".encode()).digest())
        test_count = round(len(rows) * test_fraction)
        chosen.extend(rows[:test_count] if part == "test" else rows[test_count:])
    return np.array(sorted(chosen), dtype=np.int64)


@dataclass(frozen=True)
class PromptTemplate:
    """`pattern.format_map(fields)`; the pattern must end right before the label word (no trailing space)."""

    pattern: str

    def __post_init__(self) -> None:
        if self.pattern != self.pattern.rstrip():
            raise ConfigError(
                f"template {self.pattern!r} ends with whitespace; the label word carries the space"
            )

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.pattern) if name)

    def __call__(self, fields: Mapping[str, str]) -> str:
        return self.pattern.format_map(fields)


@dataclass(frozen=True)
class Task:
    """A classification task scored by the language model's next-token logits of the label words.

    Implements the Task protocol (tasks/protocol.py): metrics "accuracy" (primary) and "loss"; rows are
    partitioned by their class.
    """

    primary_metric: ClassVar[str] = "accuracy"

    name: str
    label_words: tuple[str, ...]  # one single-token word per label, e.g. (" terrible", " great")
    template: Callable[[Mapping[str, str]], str]  # text fields -> prompt ending before the label word
    sources: Mapping[str, SplitSource]  # split name ("train", "test", ...) -> where to find it
    text_fields: tuple[str, ...]  # fields the template reads; also the columns of a file given by path
    label_names: tuple[str, ...]  # human names, index = label; accepted as raw labels in files
    # verbalizer: the label words' next-token logits (single tokens); options: MeZO's train_as_classification,
    # each label word (any number of tokens) scored by its mean log-probability (tasks/options.py)
    loss_kind: str = "verbalizer"

    def __post_init__(self) -> None:
        if self.loss_kind not in LOSSES:
            raise ConfigError(f"task.loss: must be one of {', '.join(LOSSES)} for task {self.name!r}, "
                              f"got {self.loss_kind!r}")
        if len(self.label_words) < 2 or len(self.label_names) != len(self.label_words):
            raise ConfigError(
                f"task {self.name!r}: needs >= 2 label words and one name per word, got "
                f"words {self.label_words} and names {self.label_names}"
            )
        keys = [w.strip().lower() for w in self.label_words] + [n.strip().lower() for n in self.label_names]
        for index, key in enumerate(keys):
            other = keys.index(key)
            if other % self.num_labels != index % self.num_labels:
                raise ConfigError(f"task {self.name!r}: label {key!r} names two different classes")
        if isinstance(self.template, PromptTemplate) and self.template.fields != set(self.text_fields):
            raise ConfigError(
                f"task {self.name!r}: template fields {sorted(self.template.fields)} "
                f"differ from text_fields {list(self.text_fields)}"
            )
        for split, source in self.sources.items():
            for spec in (source.file, source.hub):
                bad = {
                    k: v for k, v in ((spec and spec.label_map) or {}).items() if not 0 <= v < self.num_labels
                }
                if bad:
                    raise ConfigError(
                        f"task {self.name!r}, split {split!r}: label_map values out of range {bad}"
                    )

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    @property
    def partition_names(self) -> tuple[str, ...]:
        """Rows are partitioned by class: the class names."""
        return self.label_names

    def configure(self, options: Mapping[str, Any]) -> Task:
        """This task with `options` applied: only "loss" (LOSSES); the generation settings are refused."""
        unknown = sorted(set(options) - {"loss"})
        if unknown:
            raise ConfigError(f"task {self.name!r} does not take task.{unknown[0]} (its settings: loss)")
        return replace(self, loss_kind=options["loss"]) if "loss" in options else self

    @property
    def loss_name(self) -> str:
        return self.loss_kind

    @property
    def splits(self) -> list[str]:
        return list(self.sources)

    def load(
        self,
        split: str,
        *,
        path: str | Path | None = None,
        data_dir: str | Path | None = None,
        hub: str | None = None,
    ) -> ClassificationData:
        """Prompts and labels of `split`, from `path`, else `data_dir`, else the hub (see module doc).

        `path` is read as is (no holdout split): a .csv/.tsv with a header, .jsonl or .json (JSON lines or
        one array, as `datasets`' json loader reads), optionally .gz, or a folder written by `datasets`'
        save_to_disk (a DatasetDict gives its `split`), with columns `text_fields` and `label` (an index, a
        label name or word). `hub` ("org/name" or "org/name:config") replaces the task's own hub dataset.
        """
        if path is not None:
            identity = {field: field for field in self.text_fields}
            decode = label_decoder(self.num_labels, self.label_names, self.label_words)
            if is_saved_dataset(path):
                return self._prompts(read_saved(path, split, identity, decode))
            return self._prompts(read_examples(path, identity, decode))
        source = self.sources.get(split)
        if source is None:
            raise ConfigError(f"task {self.name!r} has no split {split!r}; known splits: {self.splits}")
        if hub is not None:
            source = replace(source, hub=self._hub_override(hub, split, source.hub))
        tried: list[str] = []
        if data_dir is not None and source.file is None:
            tried.append(f"no local file is known for {self.name!r} split {split!r}")
        # the user's data_dir first, then the data shipped in the package (the demo's subset), then the hub
        for directory in (data_dir, BUNDLED_DATA_DIR) if source.file is not None else ():
            if directory is None:
                continue
            file_path = Path(directory) / source.file.relpath
            if file_path.is_file():
                if directory is BUNDLED_DATA_DIR:
                    logger.info("task %s split %s: the subset shipped with meerkat-fl, %s", self.name, split, file_path)
                return self._prompts(self._read_file(source.file, file_path))
            if directory is data_dir:
                tried.append(f"{file_path} does not exist")
        if source.hub is not None:
            hub = source.hub
            decode = label_decoder(self.num_labels, overrides=hub.label_map)
            result = read_hub(hub.name, hub.config, hub.split, hub.fields, decode, hub.label_column)
            if isinstance(result, Examples):
                return self._prompts(result)
            tried.append(f"Hugging Face {hub.name!r}: {result}")
        raise DataError(self._missing_message(split, source, tried))

    def _hub_override(self, hub: str, split: str, known: HubSource | None) -> HubSource:
        """The split `split` of hub dataset `hub`, with the columns of the task's own hub source (or the
        task's field names when it has none)."""
        name, config = parse_hub_id(hub)
        if known is not None:
            return replace(known, name=name, config=config)
        return HubSource(name, config, split, {field: field for field in self.text_fields})

    def encode(self, tokenizer: Any, data: ClassificationData, max_length: int = 128) -> EncodedData | OptionsData:
        """Token ids of every prompt and of the label words: one token each (see base.encode), or, for the
        options loss, any number (options.encode_options)."""
        if self.loss_kind == "options":
            return encode_options(tokenizer, data, self.label_words, max_length)
        return encode(tokenizer, data, self.label_words, max_length)

    def loss(self, model: Any, batch: Batch | OptionsBatch) -> float:
        """Mean cross-entropy of the true label over the label-word logits at the answer position, or over the
        options' mean log-probabilities (nats)."""
        if isinstance(batch, OptionsBatch):
            return options_loss(model, batch)
        return classification_loss(model, batch)

    def loss_tensor(self, model: Any, batch: Batch | OptionsBatch) -> torch.Tensor:
        """The same loss as a differentiable 0-d tensor (first-order training)."""
        if isinstance(batch, OptionsBatch):
            return options_loss_tensor(model, batch)
        return classification_loss_tensor(model, batch)

    def evaluate(self, model: Any, data: EncodedData | OptionsData, batch_size: int = 32,
                 progress: bool | None = False) -> dict[str, float]:
        """{"accuracy", "loss"} of `model` on `data` (base.classification_metrics, options.options_metrics)."""
        if isinstance(data, OptionsData):
            return options_metrics(model, data, batch_size, progress=progress)
        return classification_metrics(model, data, batch_size, progress=progress)

    def _read_file(self, spec: FileSource, file_path: Path) -> Examples:
        decode = label_decoder(self.num_labels, self.label_names, self.label_words, spec.label_map)
        examples = read_examples(
            file_path,
            spec.fields,
            decode,
            label_column=spec.label_column,
            kind=spec.kind,
            columns=spec.columns,
            encoding=spec.encoding,
            drop_empty=spec.drop_empty,
        )
        if spec.holdout is None:
            return examples
        return examples.subset(
            holdout_indices(examples.labels, spec.holdout, HOLDOUT_TEST_FRACTION, HOLDOUT_SEED)
        )

    def _prompts(self, examples: Examples) -> ClassificationData:
        try:
            prompts = [self.template(row) for row in examples.fields]
        except KeyError as exc:
            raise DataError(
                f"{examples.source}: task {self.name!r} template needs field {exc.args[0]!r}"
            ) from None
        return ClassificationData(prompts, examples.labels, examples.source)

    def _missing_message(self, split: str, source: SplitSource, tried: list[str]) -> str:
        columns = ", ".join([*self.text_fields, "label"])
        local = "a local .csv/.tsv/.jsonl/.json file (optionally .gz) or a `datasets` save_to_disk folder"
        options = [f"(1) path= {local}, with columns {columns}"]
        where = f" holding {source.file.relpath}" if source.file else ""
        options.append(
            f"(2) data_dir= (or MEERKAT_DATA_DIR for the CLI) a directory laid out like shared/data{where}"
        )
        if source.hub is not None:
            options.append(
                f"(3) network access to the Hugging Face dataset {source.hub.name!r} (needs `datasets`)"
            )
        else:
            options.append("(3) network access to a Hugging Face dataset: none is known for this split")
        detail = f" Tried: {'; '.join(tried)}." if tried else ""
        return (
            f"no data for task {self.name!r} split {split!r}. Provide one of: {'; '.join(options)}.{detail}"
        )
