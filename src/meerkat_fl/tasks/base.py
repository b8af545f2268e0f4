"""Classification as language-model scoring: prompt data, tokenised data, batches and the label scorer.

A task turns each example into a prompt that ends right before the answer; the model's next-token
scores for the task's label words (the verbalizer) are the class logits, as in MeZO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meerkat_fl.errors import ConfigError, DataError


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


@dataclass
class EncodedData:
    """Token ids of every prompt, tokenised once; batches are cut from it."""

    token_ids: list[list[int]]
    labels: np.ndarray  # int64, shape [N]
    pad_id: int

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.token_ids):
            raise DataError(f"{len(self.token_ids)} token sequences but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.token_ids)

    def lengths(self) -> np.ndarray:
        """Number of tokens of each prompt, int64 [N]."""
        return np.array([len(ids) for ids in self.token_ids], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> EncodedData:
        """The rows at `indices`, in that order (token lists are shared, not copied)."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return EncodedData([self.token_ids[i] for i in index], self.labels[index], self.pad_id)

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
        return Batch(
            input_ids.to(device), attention_mask.to(device), last_index.to(device), labels.to(device)
        )


def _special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens (e.g. BOS) the tokenizer puts before the text, found by probing it."""
    with_special = list(tokenizer("a")["input_ids"])
    bare = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start]
    return []


def encode(tokenizer: Any, data: ClassificationData, max_length: int = 128) -> EncodedData:
    """Tokenise every prompt once: special prefix (BOS, if the tokenizer adds one) + text tokens.

    A prompt longer than `max_length` tokens loses tokens from the left of its text, so the template's
    tail (the cue right before the answer) survives. Special tokens a tokenizer would append (EOS) are
    left out on purpose: the last token must be the one that predicts the label word.
    """
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
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return EncodedData(token_ids, data.labels.copy(), int(pad_id))


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


class LabelScorer:
    """Scores the label words at the answer position only.

    The hidden state of the last real token times the lm_head rows of the label tokens (plus bias, if
    any) gives [B, C] logits. The full-vocabulary logits are never computed. Works for Llama-style
    Hugging Face causal LMs whose decoder output is already final-normed and whose logits are the plain
    lm_head projection. The model's train/eval mode is left as the caller set it.
    """

    def __init__(self, model: Any, tokenizer: Any, label_words: Sequence[str]) -> None:
        if len(label_words) < 2:
            raise ConfigError(f"need at least two label words, got {list(label_words)}")
        self.model = model
        self.label_words = tuple(label_words)
        self.label_ids = label_token_ids(tokenizer, label_words)

    @property
    def num_labels(self) -> int:
        return len(self.label_ids)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def label_logits(self, batch: Batch) -> torch.Tensor:
        """Label-word logits at each row's answer position, float32 [B, C]."""
        return self.label_logits_tensor(batch)

    def label_logits_tensor(self, batch: Batch) -> torch.Tensor:
        """``label_logits`` with autograd left as the caller set it (first-order training differentiates it)."""
        get_decoder = getattr(self.model, "get_decoder", None)
        decoder = get_decoder() if get_decoder is not None else self.model.model
        hidden = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        answer = hidden[rows, batch.last_index.to(hidden.device)].float()  # [B, H]
        head = self.model.get_output_embeddings()
        label_ids = torch.tensor(self.label_ids, device=head.weight.device)
        logits = answer @ head.weight[label_ids].float().T  # [B, C]
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[label_ids].float()
        return logits

    @torch.no_grad()
    def loss(self, batch: Batch) -> float:
        """Mean cross-entropy of the true label over the C label logits (nats)."""
        return float(self.loss_tensor(batch))

    def loss_tensor(self, batch: Batch) -> torch.Tensor:
        """``loss`` as a 0-d tensor, differentiable when the trainable tensors require grad (first order)."""
        logits = self.label_logits_tensor(batch)
        return F.cross_entropy(logits, batch.labels.to(logits.device))

    def predict(
        self, data: EncodedData, batch_size: int = 32, device: torch.device | str | None = None
    ) -> np.ndarray:
        """Argmax label of every row, int64 [N], in the data's order (batches are cut by length)."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        target = self._device() if device is None else torch.device(device)
        order = np.argsort(data.lengths(), kind="stable")
        predictions = np.empty(len(data), dtype=np.int64)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits = self.label_logits(data.batch(chunk, device=target))
            predictions[chunk] = logits.argmax(dim=-1).cpu().numpy()
        return predictions

    def accuracy(
        self, data: EncodedData, batch_size: int = 32, device: torch.device | str | None = None
    ) -> float:
        """Fraction of rows whose argmax label word is the true label, in [0, 1]."""
        if len(data) == 0:
            raise DataError("cannot compute accuracy on zero examples")
        predictions = self.predict(data, batch_size=batch_size, device=device)
        return float(np.mean(predictions == data.labels))
