"""Generation as language modelling of the response: encoding with truncation, the response-only loss,
greedy generation and ROUGE-L.

A row is `prompt tokens + response tokens + EOS`. Truncation keeps the response and its EOS and cuts the
prompt from the left (the cue right before the response survives), never the reverse: the response takes at
most `max_response_length` tokens (a longer one keeps its first tokens and loses its EOS: stopping there is
not what the reference does), the prompt what is left of `max_length`, at most `max_prompt_length`.

The loss is the mean cross-entropy over the response tokens (and EOS) of a batch, over the full vocabulary,
the prompt masked out. The logits are the model's own (its forward, so any final processing such as Gemma-2's
soft-capping applies), computed only at the positions that predict a response token: the forward gets
`logits_to_keep` as a boolean [B, L] mask of those positions (transformers >= 5 slices the hidden states with
it before the output head); on transformers 4.x, which takes only a 1-D tensor of positions shared by every
row, the union of the batch's response positions is kept and each row's own picked. Either way no
B x L x V logits are made for the prompt. [choice] The model's forward rather than the decoder's hidden states
and a hand-applied head: one code path that is right for every model the forward is right for.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.progress import bar
from meerkat_fl.tasks.base import PER_ROW_POSITIONS, _special_prefix, pad_token_id

logger = logging.getLogger(__name__)


@dataclass
class GenerationBatch:
    """A right-padded batch of prompt + response rows and the targets of the response positions."""

    input_ids: torch.Tensor  # [B, L] int64, right padded with the pad id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens
    loss_positions: torch.Tensor  # [B, L] bool: position p predicts the response token at p + 1
    targets: torch.Tensor  # [N] int64: the token each True position predicts, in row-major order


@dataclass
class GenerationData:
    """Prompt and response token ids of every row, tokenised once; batches are cut from it.

    `references` are the untruncated response texts (what generations are scored against); `tokenizer`
    decodes generations. `counts` says how many rows were left out or cut, and why.
    """

    prompt_ids: list[list[int]]
    target_ids: list[list[int]]  # response tokens, plus EOS unless the response was cut
    references: list[str]
    categories: np.ndarray  # int64 [N]
    pad_id: int
    eos_id: int
    tokenizer: Any = field(repr=False)
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.categories = np.asarray(self.categories, dtype=np.int64).reshape(-1)
        if not len(self.prompt_ids) == len(self.target_ids) == len(self.references) == len(self.categories):
            raise DataError("prompt, response, reference and category lists differ in length")

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def partition_labels(self) -> np.ndarray:
        return self.categories

    def lengths(self) -> np.ndarray:
        """Tokens of each row (prompt + response), int64 [N]."""
        return np.array([len(p) + len(t) for p, t in zip(self.prompt_ids, self.target_ids)], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> GenerationData:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        return GenerationData(
            [self.prompt_ids[i] for i in index], [self.target_ids[i] for i in index],
            [self.references[i] for i in index], self.categories[index], self.pad_id, self.eos_id,
            self.tokenizer, dict(self.counts),
        )

    def batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> GenerationBatch:
        """Right-pad the rows at `indices` (prompt + response) to their longest length, on `device`."""
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(index) == 0:
            raise DataError("cannot build a batch from zero indices")
        rows = [(self.prompt_ids[i], self.target_ids[i]) for i in index]
        width = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        loss_positions = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (prompt, target) in enumerate(rows):
            ids = prompt + target
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, : len(ids)] = 1
            loss_positions[row, len(prompt) - 1 : len(ids) - 1] = True
        targets = torch.tensor([token for _, target in rows for token in target], dtype=torch.int64)
        return GenerationBatch(input_ids.to(device), attention_mask.to(device), loss_positions.to(device),
                               targets.to(device))

    def prompt_batch(self, indices: Sequence[int] | np.ndarray, device: torch.device | str = "cpu"):
        """(input_ids, attention_mask) of the prompts at `indices`, left padded (for generation)."""
        rows = [self.prompt_ids[i] for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(device), attention_mask.to(device)


def token_budget(max_length: int, prefix: int, max_prompt_length: int | None,
                 max_response_length: int | None) -> tuple[int, int]:
    """(response tokens, prompt tokens incl. the special prefix) a row may take at most; ConfigError if the
    limits leave no room for one prompt token after the prefix. [choice] Unset response limit: half of
    max_length."""
    response = max_length // 2 if max_response_length is None else max_response_length
    response = min(response, max_length - prefix - 1)
    prompt = max_length - 1 if max_prompt_length is None else min(max_prompt_length, max_length - 1)
    if response < 1 or prompt <= prefix:
        raise ConfigError(
            f"task.max_length={max_length}, max_prompt_length={max_prompt_length}, max_response_length="
            f"{max_response_length} leave no room for a prompt token and a response token "
            f"(the tokenizer puts {prefix} special tokens first)")
    return response, prompt


def encode_rows(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], categories: np.ndarray, *,
    max_length: int, max_prompt_length: int | None = None, max_response_length: int | None = None,
    special_prefix: bool = True, source: str = "",
) -> GenerationData:
    """Tokenise every (prompt, response) once and truncate it (see the module doc).

    `special_prefix`: put the tokenizer's own leading special tokens (BOS) before the prompt (False for
    prompts from a chat template, which writes its own). Rows whose response is no token are left out,
    counted in `counts` and logged; cut prompts and responses are counted too.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token: a response cannot be terminated")
    prefix = _special_prefix(tokenizer) if special_prefix else []
    response_room, prompt_room = token_budget(max_length, len(prefix), max_prompt_length, max_response_length)
    prompt_texts = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if len(prompts) else []
    response_texts = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if len(responses) else []
    counts = {"rows without a response token": 0, "responses cut": 0, "prompts cut": 0}
    kept: list[int] = []
    prompt_ids: list[list[int]] = []
    target_ids: list[list[int]] = []
    for row, (prompt, response) in enumerate(zip(prompt_texts, response_texts)):
        if not response:
            counts["rows without a response token"] += 1
            continue
        target = list(response) + [int(eos)]
        if len(target) > response_room:
            target, counts["responses cut"] = list(response[:response_room]), counts["responses cut"] + 1
        room = min(prompt_room, max_length - len(target)) - len(prefix)
        if len(prompt) > room:
            counts["prompts cut"] += 1
        prompt_ids.append(prefix + list(prompt[-room:]))
        target_ids.append(target)
        kept.append(row)
    if counts["rows without a response token"]:
        logger.warning("%s: left out %d rows whose response is no token", source,
                       counts["rows without a response token"])
    if counts["prompts cut"] or counts["responses cut"]:
        logger.info("%s: %d prompts cut from the left, %d responses cut to %d tokens", source,
                    counts["prompts cut"], counts["responses cut"], response_room)
    if not kept:
        raise DataError(f"{source}: no row has a response token")
    return GenerationData(prompt_ids, target_ids, [responses[i] for i in kept], np.asarray(categories)[kept],
                          pad_token_id(tokenizer), int(eos), tokenizer, counts)


def response_logits(model: Any, batch: GenerationBatch, *, per_row: bool | None = None) -> torch.Tensor:
    """The model's own logits at the positions that predict a response token, [N, V] (row-major order).

    `per_row=False` keeps the union of the batch's response positions for every row (transformers 4.x) and
    picks each row's own: more head rows, the same values.
    """
    per_row = PER_ROW_POSITIONS if per_row is None else per_row
    mask = batch.loss_positions
    keep = mask if per_row else torch.nonzero(mask.any(dim=0)).reshape(-1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                   logits_to_keep=keep).logits
    count = int(mask.sum())
    if per_row:
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] != count:
            raise ConfigError(f"the model returned {logits.shape[0]} logit rows for {count} response positions; "
                              "it does not support a boolean logits_to_keep")
        return logits
    if logits.ndim != 3 or logits.shape[1] != keep.numel():
        raise ConfigError(f"the model returned logits of shape {tuple(logits.shape)} for {keep.numel()} positions")
    return logits[mask[:, keep]]


@torch.no_grad()
def response_loss(model: Any, batch: GenerationBatch) -> float:
    """Mean cross-entropy of the response tokens (EOS included) over the full vocabulary (nats)."""
    return float(response_loss_tensor(model, batch))


def response_loss_tensor(model: Any, batch: GenerationBatch) -> torch.Tensor:
    """``response_loss`` as a 0-d tensor, autograd as the caller set it (first-order training)."""
    logits = response_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.targets.to(logits.device))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _by_length(data: GenerationData, batch_size: int, lengths: np.ndarray):
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


@torch.no_grad()
def split_loss(model: Any, data: GenerationData, batch_size: int = 8, progress: bool | None = False) -> float:
    """Mean response-token cross-entropy over the whole split (every response token weighs the same)."""
    total, tokens = 0.0, 0
    rows = bar(len(data), "eval loss", "row", progress, leave=False)
    for chunk in _by_length(data, batch_size, data.lengths()):
        batch = data.batch(chunk, _device(model))
        logits = response_logits(model, batch)
        total += float(F.cross_entropy(logits.float(), batch.targets.to(logits.device), reduction="sum"))
        tokens += int(batch.targets.numel())
        rows.update(len(chunk))
    rows.close()
    return total / tokens


@torch.no_grad()
def generate(model: Any, data: GenerationData, max_new_tokens: int, batch_size: int = 8,
             progress: bool | None = None) -> list[str]:
    """Greedy continuations of every prompt (at most `max_new_tokens`, stopping at EOS), decoded, in the
    data's order. Prompts are batched by length and left padded; `progress` None: a bar on a terminal."""
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ConfigError(f"task.max_new_tokens must be >= 1, got {max_new_tokens}")
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=data.pad_id, eos_token_id=data.eos_id)
    texts = [""] * len(data)
    lengths = np.array([len(ids) for ids in data.prompt_ids], dtype=np.int64)
    rows = bar(len(data), "generate", "row", progress, leave=False)
    for chunk in _by_length(data, batch_size, lengths):
        input_ids, attention_mask = data.prompt_batch(chunk, _device(model))
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for row, ids in zip(chunk, out[:, input_ids.shape[1] :].tolist()):
            if data.eos_id in ids:
                ids = ids[: ids.index(data.eos_id)]
            texts[row] = data.tokenizer.decode(ids, skip_special_tokens=True).strip()
        rows.update(len(chunk))
    rows.close()
    return texts


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 of predictions against references, by `rouge-score` (Porter stemming, as the
    Natural-Instructions evaluation that FedKSeed reports uses), in [0, 1]."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not references:
        raise DataError(f"ROUGE-L needs as many predictions as references (> 0), got {len(predictions)} and "
                        f"{len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]))


def generation_metrics(model: Any, data: GenerationData, batch_size: int, max_new_tokens: int,
                       progress: bool | None = False) -> dict[str, float]:
    """{"loss": mean response-token cross-entropy, "rouge_l": mean ROUGE-L F1 of greedy generations}."""
    if len(data) == 0:
        raise DataError("cannot evaluate on zero examples")
    loss = split_loss(model, data, batch_size, progress)
    texts = generate(model, data, max_new_tokens, batch_size, progress)
    return {"loss": loss, "rouge_l": rouge_l(texts, data.references)}
