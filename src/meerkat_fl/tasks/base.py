"""Classification as language-model scoring: prompt data, tokenised data, batches and the label scoring.

A task turns each example into a prompt that ends right before the answer; the model's next-token
scores for the task's label words (the verbalizer) are the class logits, as in MeZO. The scores are the
model's own logits (its output head and whatever it applies after, such as Gemma-2's soft-capping),
computed at the answer position only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.progress import bar


@dataclass
class ClassificationData:
    """Prompts (text ending right before the label word) and their integer labels."""

    prompts: list[str]
    labels: np.ndarray  # int64, shape [N], values in [0, num_labels)
    source: str  # file path or hub name the rows came from

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) != len(self.prompts):
            raise DataError(
                f"{self.source}: {len(self.prompts)} prompts but labels of shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def partition_labels(self) -> np.ndarray:
        """The class of each row: what partitioners split on."""
        return self.labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> ClassificationData:
        """The rows at `indices`, in that order (same source)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ClassificationData([self.prompts[i] for i in index], self.labels[index], self.source)


@dataclass
class Batch:
    """A right-padded batch of prompts; the answer is predicted at `last_index`."""

    input_ids: torch.Tensor  # [B, L] int64, right padded with the pad id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    last_index: torch.Tensor  # [B] int64, position of the last real token
    labels: torch.Tensor  # [B] int64
    label_token_ids: torch.Tensor  # [C] int64, the token of each label word (column c is class c)


@dataclass
class EncodedData:
    """Token ids of every prompt, tokenised once; batches are cut from it."""

    token_ids: list[list[int]]
    labels: np.ndarray  # int64, shape [N]
    pad_id: int
    label_token_ids: tuple[int, ...]  # the single token of each label word, index = label

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.token_ids):
            raise DataError(f"{len(self.token_ids)} token sequences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def partition_labels(self) -> np.ndarray:
        """The class of each row: what partitioners split on."""
        return self.labels

    def lengths(self) -> np.ndarray:
        """Number of tokens of each prompt, int64 [N]."""
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> EncodedData:
        """The rows at `indices`, in that order (token lists are shared, not copied)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return EncodedData([self.token_ids[i] for i in index], self.labels[index], self.pad_id, self.label_token_ids)

    def batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> Batch:
        """Right-pad the rows at `indices` to their longest length and put them on `device`."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(index) == 0:
            raise DataError("cannot build a batch from zero indices")
        rows = [self.token_ids[i] for i in index]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for row, ids in enumerate(rows):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, : len(ids)] = 1
        last_index = torch.tensor([len(ids) - 1 for ids in rows], dtype=torch.int64)
        labels = torch.from_numpy(self.labels[index].copy())
        label_token_ids = torch.tensor(self.label_token_ids, dtype=torch.int64)
        return Batch(
            input_ids.to(device), attention_mask.to(device), last_index.to(device), labels.to(device),
            label_token_ids.to(device),
        )


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens (e.g. BOS) the tokenizer puts before the text, found by probing it."""
    with_special = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start]
    return []


def encode(
    tokenizer: Any, data: ClassificationData, label_words: Sequence[str], max_length: int = 128
) -> EncodedData:
    """Tokenise every prompt once: special prefix (BOS, if the tokenizer adds one) + text tokens.

    A prompt longer than `max_length` tokens loses tokens from the left of its text, so the template's
    tail (the cue right before the answer) survives. Special tokens a tokenizer would append (EOS) are
    left out on purpose: the last token must be the one that predicts the label word.
    """
    answer_ids = tuple(label_token_ids(tokenizer, label_words))  # first: a bad verbalizer fails fast
    token_ids = prompt_token_ids(tokenizer, data, max_length)
    return EncodedData(token_ids, data.labels.copy(), pad_token_id(tokenizer), answer_ids)


def prompt_token_ids(tokenizer: Any, data: ClassificationData, max_length: int) -> list[list[int]]:
    """Special prefix + the last text tokens of every prompt, at most `max_length` tokens each (see encode)."""
    prefix = _special_prefix(tokenizer)
    if max_length <= len(prefix):
        raise ConfigError(
            f"max_length={max_length} leaves no room for text after {len(prefix)} special tokens"
        )
    keep = max_length - len(prefix)
    texts = tokenizer(list(data.prompts), add_special_tokens=False)["input_ids"] if len(data) else []
    token_ids: list[list[int]] = []
    for row, ids in enumerate(texts):
        if not ids:
            raise DataError(f"{data.source}: prompt {row} tokenises to nothing")
        token_ids.append(prefix + list(ids[-keep:]))
    return token_ids


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out: any id will do)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad_id)


def label_token_ids(tokenizer: Any, label_words: Sequence[str]) -> list[int]:
    """The single token id of each label word; ConfigError names a word that is not exactly one token."""
    ids: list[int] = []
    for word in label_words:
        pieces = list(tokenizer(word, add_special_tokens=False)["input_ids"])
        if len(pieces) != 1:
            raise ConfigError(
                f"label word {word!r} is {len(pieces)} tokens {pieces} under this tokenizer; "
                "each label word must be exactly one token"
            )
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"label words {list(label_words)} do not map to distinct tokens: {ids}")
    return ids


# transformers >= 5 slices hidden states per row with a 2-D integer `logits_to_keep` (slice_logits_to_keep);
# older 4.x versions take only an int or a 1-D tensor of positions shared by every row.
try:
    from transformers.modeling_utils import slice_logits_to_keep as _per_row_slicing  # noqa: F401

    PER_ROW_POSITIONS = True
except ImportError:  # pragma: no cover - depends on the installed transformers
    PER_ROW_POSITIONS = False


def answer_logits(model: Any, batch: Batch, *, per_row: bool | None = None) -> torch.Tensor:
    """The model's own next-token logits at each row's answer position (`last_index`), [B, V].

    The model's forward computes them (its output head and any post-processing, e.g. Gemma-2's final
    soft-capping), but only at the answer positions: `logits_to_keep` stops it from projecting every
    position onto the vocabulary. `per_row=False` asks for the distinct answer positions of the batch for
    every row and picks each row's own (what transformers 4.x supports; more head rows, same values).
    """
    per_row = PER_ROW_POSITIONS if per_row is None else per_row
    last = batch.last_index.to(batch.input_ids.device)
    rows = torch.arange(len(last), device=last.device)
    if per_row:
        keep, pick = last[:, None], torch.zeros_like(last)
    else:
        keep, pick = torch.unique(last, return_inverse=True)
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, logits_to_keep=keep
    ).logits
    if logits.ndim != 3 or logits.shape[:2] != (len(last), keep.shape[-1]):
        raise ConfigError(
            f"the model returned logits of shape {tuple(logits.shape)} for logits_to_keep of shape "
            f"{tuple(keep.shape)}; it does not support per-position logits"
        )
    return logits[rows, pick]


def label_logits(model: Any, batch: Batch) -> torch.Tensor:
    """The logits of the label words at each row's answer position, float32 [B, C]."""
    logits = answer_logits(model, batch)
    return logits[:, batch.label_token_ids.to(logits.device)].float()


@torch.no_grad()
def classification_loss(model: Any, batch: Batch) -> float:
    """Mean cross-entropy of the true label over the C label-word logits (nats)."""
    return float(classification_loss_tensor(model, batch))


def classification_loss_tensor(model: Any, batch: Batch) -> torch.Tensor:
    """``classification_loss`` as a 0-d tensor, with autograd left as the caller set it (first-order training
    differentiates it through the trainable tensors)."""
    logits = label_logits(model, batch)
    return F.cross_entropy(logits, batch.labels.to(logits.device))


def _batches(data: EncodedData, batch_size: int, device: torch.device):
    """(rows, batch) over the whole split, cut by length so rows of a batch pad little."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(data.lengths(), kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, data.batch(chunk, device=device)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: Any, data: EncodedData, batch_size: int = 32) -> np.ndarray:
    """Argmax label of every row, int64 [N], in the data's order."""
    predictions = np.empty(len(data), dtype=np.int64)
    for chunk, batch in _batches(data, batch_size, _device(model)):
        predictions[chunk] = label_logits(model, batch).argmax(dim=-1).cpu().numpy()
    return predictions


@torch.no_grad()
def classification_metrics(model: Any, data: EncodedData, batch_size: int = 32,
                           progress: bool | None = False) -> dict[str, float]:
    """{"accuracy": share of rows whose argmax label word is the true label, "loss": mean cross-entropy}."""
    if len(data) == 0:
        raise DataError("cannot evaluate on zero examples")
    hits, total_loss = 0, 0.0
    rows = bar(len(data), "eval", "row", progress, leave=False)
    for chunk, batch in _batches(data, batch_size, _device(model)):
        logits = label_logits(model, batch)
        labels = batch.labels.to(logits.device)
        hits += int((logits.argmax(dim=-1) == labels).sum())
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        rows.update(len(chunk))
    rows.close()
    return {"accuracy": hits / len(data), "loss": total_loss / len(data)}
