"""MeZO's classification loss (`train_as_classification`): every option scored by its mean log-probability.

Each row is scored once per option: the prompt followed by the option's tokens (any number of them). An
option's score is the mean log-probability of its tokens over the full vocabulary; the loss is the
cross-entropy of the true option over the scores, the prediction their argmax. This is `task.loss = "options"`;
the default "verbalizer" loss (tasks/base.py) restricts one next-token distribution to single-token label words.
The log-probabilities come from the model's own logits at the option positions only (generation.py's
`response_logits`, with each (row, option) pair as one prompt + response sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.progress import bar
from meerkat_fl.tasks.base import ClassificationData, EncodedData, pad_token_id, prompt_token_ids
from meerkat_fl.tasks.generation import GenerationBatch, response_logits


def option_token_ids(tokenizer, options: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The tokens of each option (e.g. label word " great"); ConfigError for an empty or repeated option."""
    ids = tuple(tuple(int(t) for t in tokenizer(option, add_special_tokens=False)["input_ids"]) for option in options)
    for option, tokens in zip(options, ids):
        if not tokens:
            raise ConfigError(f"option {option!r} is no token under this tokenizer")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"options {list(options)} do not map to distinct token sequences")
    return ids


@dataclass
class OptionsBatch:
    """B rows x C options as B*C prompt + option sequences (row-major), and each row's true option."""

    sequences: GenerationBatch  # [B*C, L]; targets are the option tokens
    sequence_index: torch.Tensor  # [N] int64: the sequence each target token belongs to
    option_lengths: torch.Tensor  # [B*C] float32: tokens of each sequence's option
    labels: torch.Tensor  # [B] int64
    num_options: int


@dataclass
class OptionsData(EncodedData):
    """Prompt token ids of every row and the tokens of every option (index = label; `label_token_ids` unused);
    batches pair each row with each option."""

    option_ids: tuple[tuple[int, ...], ...] = ()

    def subset(self, indices: Sequence[int] | np.ndarray) -> OptionsData:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return OptionsData([self.token_ids[i] for i in index], self.labels[index], self.pad_id, (), self.option_ids)

    def batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> OptionsBatch:
        """Every row at `indices` followed by every option, right padded, on `device`."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(index) == 0:
            raise DataError("cannot build a batch from zero indices")
        pairs = [(self.token_ids[i], option) for i in index for option in self.option_ids]
        width = max(len(p) + len(o) for p, o in pairs)
        input_ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(pairs), width), dtype=torch.int64)
        positions = torch.zeros((len(pairs), width), dtype=torch.bool)
        for row, (prompt, option) in enumerate(pairs):
            input_ids[row, : len(prompt) + len(option)] = torch.tensor(prompt + list(option), dtype=torch.int64)
            attention_mask[row, : len(prompt) + len(option)] = 1
            positions[row, len(prompt) - 1 : len(prompt) + len(option) - 1] = True
        targets = torch.tensor([t for _, option in pairs for t in option], dtype=torch.int64)
        lengths = torch.tensor([len(option) for _, option in pairs], dtype=torch.int64)
        sequences = GenerationBatch(input_ids.to(device), attention_mask.to(device), positions.to(device),
                                    targets.to(device))
        return OptionsBatch(sequences, torch.repeat_interleave(torch.arange(len(pairs)), lengths).to(device),
                            lengths.float().to(device), torch.from_numpy(self.labels[index].copy()).to(device),
                            len(self.option_ids))


def encode_options(tokenizer, data: ClassificationData, options: Sequence[str], max_length: int) -> OptionsData:
    """Tokenise every prompt once, cut from the left so that it and its longest option fit in `max_length`."""
    option_ids = option_token_ids(tokenizer, options)
    token_ids = prompt_token_ids(tokenizer, data, max_length - max(len(o) for o in option_ids))
    return OptionsData(token_ids, data.labels.copy(), pad_token_id(tokenizer), (), option_ids)


def option_scores(model, batch: OptionsBatch) -> torch.Tensor:
    """Mean log-probability of each option's tokens after each row's prompt, float32 [B, C]."""
    logits = response_logits(model, batch.sequences).float()
    targets = batch.sequences.targets.to(logits.device)
    token_log_probs = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    sums = torch.zeros(len(batch.option_lengths), device=logits.device).index_add_(
        0, batch.sequence_index.to(logits.device), token_log_probs)
    return (sums / batch.option_lengths.to(logits.device)).view(-1, batch.num_options)


@torch.no_grad()
def options_loss(model, batch: OptionsBatch) -> float:
    """Cross-entropy of the true option over the options' mean log-probabilities (nats)."""
    return float(options_loss_tensor(model, batch))


def options_loss_tensor(model, batch: OptionsBatch) -> torch.Tensor:
    """``options_loss`` as a 0-d tensor, autograd as the caller set it (first-order training)."""
    scores = option_scores(model, batch)
    return F.cross_entropy(scores, batch.labels.to(scores.device))


@torch.no_grad()
def options_metrics(model, data: OptionsData, batch_size: int = 32, progress: bool | None = False) -> dict[str, float]:
    """{"accuracy": share of rows whose best-scored option is the true one, "loss": mean cross-entropy}."""
    if len(data) == 0:
        raise DataError("cannot evaluate on zero examples")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    rows = max(1, batch_size // len(data.option_ids))  # batch_size counts sequences: rows x options
    order = np.argsort(data.lengths(), kind="stable")
    hits, total = 0, 0.0
    done = bar(len(data), "eval", "row", progress, leave=False)
    for start in range(0, len(order), rows):
        batch = data.batch(order[start : start + rows], device)
        scores = option_scores(model, batch)
        labels = batch.labels.to(scores.device)
        hits += int((scores.argmax(dim=-1) == labels).sum())
        total += float(F.cross_entropy(scores, labels, reduction="sum"))
        done.update(len(labels))
    done.close()
    return {"accuracy": hits / len(data), "loss": total / len(data)}
