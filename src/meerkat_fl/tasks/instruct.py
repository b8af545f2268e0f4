"""Instruction tuning as a task: Dolly-15k, Alpaca, any local instruction file; the workload of FedMeZO and
FedKSeed.

Implements the Task protocol (tasks/protocol.py) with the generation kind (tasks/generation.py): the loss is
the response tokens' cross-entropy, evaluation gives "loss" and "rouge_l" (primary) of greedy generations,
rows are partitioned by category (Dolly's 8; NO_CATEGORY, iid only, for data without one).

Settings (the `task.*` keys a config passes through `configure`): `template` "alpaca" (Stanford Alpaca's
prompt, with or without the context) or "chat" (the tokenizer's own chat template, for instruct models);
`max_prompt_length`, `max_response_length` (tokens; see generation.py for the truncation), `max_new_tokens`
(generation at evaluation), `columns` ("field=column" for files whose columns are named otherwise) and
`categories` (the category names of a local file; none: its rows are not partitioned by category).

Data for a split: an explicit file `path`, else the task's file under `data_dir` (shared/data), else the
Hugging Face dataset (only its 'train' split exists: 'test' is a seeded 5% of it, by category).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks.generation import (
    GenerationBatch,
    GenerationData,
    encode_rows,
    generation_metrics,
    response_loss,
    response_loss_tensor,
)
from meerkat_fl.tasks.hub import parse_hub_id
from meerkat_fl.tasks.instruct_data import (
    InstructionData,
    column_map,
    read_hub_instructions,
    read_instructions,
)
from meerkat_fl.tasks.registry import register
from meerkat_fl.tasks.sources import HubSource, SplitSource
from meerkat_fl.tasks.task import holdout_indices

# Stanford Alpaca's prompts (alpaca/train.py PROMPT_DICT), the template FedMeZO's and FedKSeed's code use.
ALPACA_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_PLAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")
DOLLY_CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
                    "information_extraction", "open_qa", "summarization")
HUB_TEST_FRACTION, HUB_HOLDOUT_SEED = 0.05, 0  # [choice] the hub sets have one split; hold out 5% as test
OPTIONS = ("template", "loss", "max_prompt_length", "max_response_length", "max_new_tokens", "columns",
           "categories")


def alpaca_prompt(instruction: str, context: str) -> str:
    """Alpaca's prompt for a row: the context variant when the row has one."""
    if context:
        return ALPACA_CONTEXT.format(instruction=instruction, context=context)
    return ALPACA_PLAIN.format(instruction=instruction)


def chat_prompt(tokenizer: Any, instruction: str, context: str) -> str:
    """The tokenizer's chat template for one user turn (instruction, then the context), ready for the answer."""
    content = f"{instruction}\n\n{context}" if context else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@dataclass(frozen=True)
class InstructionTask:
    """A generation task over instruction rows (see the module doc)."""

    primary_metric: ClassVar[str] = "rouge_l"

    name: str
    files: Mapping[str, str]  # split -> file under data_dir, e.g. {"train": "dolly/train.jsonl.gz"}
    hub: str | None = None  # Hugging Face dataset id (its 'train' split), e.g. "databricks/databricks-dolly-15k"
    categories: tuple[str, ...] = ()  # category names, index = partition label; () = not partitioned by one
    columns: tuple[str, ...] = ()  # "field=column" for the task's files (task.columns)
    hub_columns: tuple[str, ...] = ()  # "field=column" for the hub dataset
    template: str = "alpaca"
    loss_kind: str = "response"
    max_prompt_length: int | None = None
    max_response_length: int | None = None
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"task.template: must be one of {', '.join(TEMPLATES)} for task {self.name!r}, "
                              f"got {self.template!r}")
        if self.loss_kind != "response":
            raise ConfigError(f"task.loss: task {self.name!r} is a generation task, its loss is 'response', "
                              f"got {self.loss_kind!r}")
        for key in ("max_prompt_length", "max_response_length", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"task.{key}: must be >= 1, got {value!r}")
        try:
            column_map(self.columns), column_map(self.hub_columns)
        except DataError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def sources(self) -> dict[str, SplitSource]:
        """The hub dataset of each split, as classification tasks declare theirs (the registry finds a task by its
        dataset id: task.name = "databricks/databricks-dolly-15k" is dolly)."""
        if self.hub is None:
            return {}
        name, config = parse_hub_id(self.hub)
        source = SplitSource(hub=HubSource(name, config, "train", column_map(self.hub_columns)))
        return {"train": source, "test": source}

    @property
    def loss_name(self) -> str:
        return self.loss_kind

    @property
    def partition_names(self) -> tuple[str, ...]:
        """Rows are partitioned by category: the category names (none when the data has no category)."""
        return self.categories

    def configure(self, options: Mapping[str, Any]) -> InstructionTask:
        """This task with the given `task.*` settings (OPTIONS); ConfigError names one it does not take."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"task {self.name!r} does not take task.{unknown[0]} (its settings: {', '.join(OPTIONS)})")
        renamed = {("loss_kind" if key == "loss" else key): value for key, value in options.items()}
        for key in ("columns", "categories"):
            if key in renamed:
                renamed[key] = tuple(renamed[key])
        return replace(self, **renamed)

    def load(self, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None,
             hub: str | None = None) -> InstructionData:
        """Rows of `split` from `path`, else `data_dir`, else the hub (see the module doc); `hub` (a dataset id,
        read with task.columns) replaces the task's own files and dataset."""
        columns = column_map(self.columns)
        if path is not None:
            return read_instructions(path, columns, self.categories)
        if hub is not None:
            return replace(self, files={}, hub=hub, hub_columns=self.columns).load(split, data_dir=data_dir)
        if split not in ("train", "test"):
            raise ConfigError(f"task {self.name!r} has no split {split!r}; known splits: ['train', 'test']")
        tried: list[str] = []
        relpath = self.files.get(split)
        if data_dir is not None and relpath is not None:
            file_path = Path(data_dir) / relpath
            if file_path.is_file():
                return read_instructions(file_path, columns, self.categories)
            tried.append(f"{file_path} does not exist")
        if self.hub is not None:
            name, config = parse_hub_id(self.hub)
            result = read_hub_instructions(name, config, "train", column_map(self.hub_columns), self.categories)
            if isinstance(result, InstructionData):
                return result.subset(holdout_indices(result.categories, split, HUB_TEST_FRACTION, HUB_HOLDOUT_SEED))
            tried.append(f"Hugging Face {self.hub!r}: {result}")
        raise DataError(self._missing_message(split, relpath, tried))

    def encode(self, tokenizer: Any, data: InstructionData, max_length: int) -> GenerationData:
        """Prompt (by the template) and response tokens of every row, truncated to `max_length` tokens."""
        if self.template == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("task.template=chat: the tokenizer has no chat template (use 'alpaca')")
            prompts = [chat_prompt(tokenizer, i, c) for i, c in zip(data.instructions, data.contexts)]
        else:
            prompts = [alpaca_prompt(i, c) for i, c in zip(data.instructions, data.contexts)]
        return encode_rows(tokenizer, prompts, data.responses, data.categories, max_length=max_length,
                           max_prompt_length=self.max_prompt_length, max_response_length=self.max_response_length,
                           special_prefix=self.template != "chat", source=data.source)

    def loss(self, model: Any, batch: GenerationBatch) -> float:
        """Mean cross-entropy of the batch's response tokens, full vocabulary, prompt masked (nats)."""
        return response_loss(model, batch)

    def loss_tensor(self, model: Any, batch: GenerationBatch) -> torch.Tensor:
        """The same loss as a differentiable 0-d tensor (first-order training)."""
        return response_loss_tensor(model, batch)

    def evaluate(self, model: Any, data: GenerationData, batch_size: int = 32,
                 progress: bool | None = False) -> dict[str, float]:
        """{"loss", "rouge_l"} of `model` on `data` (generation.generation_metrics)."""
        return generation_metrics(model, data, batch_size, self.max_new_tokens, progress=progress)

    def _missing_message(self, split: str, relpath: str | None, tried: list[str]) -> str:
        options = ["(1) path= a local .jsonl/.csv/.tsv file (optionally .gz) with columns instruction, "
                   "context, response" + (", category" if self.categories else "")]
        if relpath is not None:
            options.append(f"(2) data_dir= (or MEERKAT_DATA_DIR) a directory holding {relpath}")
        if self.hub is not None:
            options.append(f"(3) network access to the Hugging Face dataset {self.hub!r} (needs `datasets`)")
        detail = f" Tried: {'; '.join(tried)}." if tried else ""
        return f"no data for task {self.name!r} split {split!r}. Provide one of: {'; '.join(options)}.{detail}"


register(InstructionTask("dolly", {"train": "dolly/train.jsonl.gz", "test": "dolly/test.jsonl"},
                         hub="databricks/databricks-dolly-15k", categories=DOLLY_CATEGORIES))
# The shared subset stores Alpaca's input/output under Dolly's keys; the hub dataset has its own names.
register(InstructionTask("alpaca", {"train": "alpaca_subset/train.jsonl.gz", "test": "alpaca_subset/test.jsonl"},
                         hub="tatsu-lab/alpaca", hub_columns=("context=input", "response=output")))
# Any local instruction file: task.train_path / task.test_path (task.columns, task.categories as needed).
register(InstructionTask("instruct", {}))
