"""The Task protocol: all that training, federation, run folders and plots need from a task.

A task reads a split (`load`), tokenises it once (`encode`), scores a batch (`loss`, the only thing the
zeroth-order core sees) and evaluates a split (`evaluate`, metrics by name). `primary_metric` names the
metric that plots and tables show. `partition_labels` of a split are what a partitioner splits clients on:
the class for classification, a category for generation (-1: the row has none; only iid partitions apply).
`configure` returns the task with the `task.*` settings of a config that are the task's own (its loss,
template, token limits): a builder passes the ones the user set, a task refuses any it does not take.
Classification (tasks/task.py) and generation (tasks/instruct.py) implement it. Nothing above tasks/ names
a task's metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Split(Protocol):
    """Rows of one split, raw (prompts) or encoded (token ids); sliced by row index."""

    @property
    def partition_labels(self) -> np.ndarray:
        """int64 [N]: the label each row is partitioned by (class or category index)."""
        ...

    def __len__(self) -> int: ...

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split: ...


@runtime_checkable
class EncodedSplit(Split, Protocol):
    """A tokenised split that cuts batches for `Task.loss`."""

    def batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> Any: ...


@runtime_checkable
class TaskProtocol(Protocol):
    """What every task kind implements (see the module doc)."""

    name: str
    primary_metric: str  # a key of evaluate()'s result, e.g. "accuracy"

    @property
    def loss_name(self) -> str:
        """The training loss this task computes (e.g. "verbalizer", "options", "response"): run summaries record it."""
        ...

    @property
    def partition_names(self) -> tuple[str, ...]:
        """A name per partition label (index = label), for histograms."""
        ...

    def configure(self, options: Mapping[str, Any]) -> TaskProtocol:
        """This task with `options` (task setting name -> value) applied; ConfigError names one it does not take."""
        ...

    def load(
        self, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None,
        hub: str | None = None,
    ) -> Split:
        """The rows of `split` (e.g. "train", "test"), from a file `path`, a data folder, a Hugging Face dataset
        `hub`, or elsewhere (a task may ignore the sources it does not read)."""
        ...

    def encode(self, tokenizer: Any, data: Split, max_length: int) -> EncodedSplit:
        """Tokenise every row once, at most `max_length` tokens each."""
        ...

    def loss(self, model: Any, batch: Any) -> float:
        """The batch's mean loss under `model` (nats); no gradient is taken."""
        ...

    def loss_tensor(self, model: Any, batch: Any) -> torch.Tensor:
        """`loss` as a 0-d tensor with autograd as the caller set it (the first-order baseline's backprop)."""
        ...

    def evaluate(self, model: Any, data: EncodedSplit, batch_size: int = 32, progress: bool | None = False
                 ) -> dict[str, float]:
        """Metrics of `model` on `data` by name; includes `primary_metric`. `progress`: a bar over the rows
        (meerkat_fl.progress: None = on a terminal)."""
        ...


@dataclass
class Scorer:
    """A task bound to a model: the loss and evaluation calls the training code makes."""

    task: TaskProtocol
    model: Any

    @property
    def primary_metric(self) -> str:
        return self.task.primary_metric

    @property
    def loss_name(self) -> str:
        return self.task.loss_name

    def loss(self, batch: Any) -> float:
        return self.task.loss(self.model, batch)

    def loss_tensor(self, batch: Any) -> torch.Tensor:
        return self.task.loss_tensor(self.model, batch)

    def evaluate(self, data: EncodedSplit, batch_size: int = 32, progress: bool | None = False) -> dict[str, float]:
        return self.task.evaluate(self.model, data, batch_size, progress=progress)
