"""Static sparse masks: sensitive (SensZOQ), random, weight-magnitude and dense, behind one signature.

A mask is an explicit list of trainable tensors, in the model's parameter order, with the flat indices
chosen in each (or ``None`` for a whole tensor). The sensitive mask also keeps the masked *mean*
pre-training gradient ``(grad f_p)_m``, which the server needs for GradIP (method doc section 4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from meerkat_fl.errors import ConfigError, DataError, MaskMismatch
from meerkat_fl.progress import Progress, bar

MASK_FORMAT = "meerkat-mask/1"
KINDS = ("sensitive", "random", "magnitude", "dense")  # what build_mask builds
FILE_KINDS = (*KINDS, "lora")  # what a mask or patch file may hold ("lora": see lora.py)
SCOPES = ("linear", "all")
SELECTIONS = ("per_tensor", "global")
SCORES = ("fisher", "grad_squared")


@dataclass(frozen=True)
class Mask:
    """Per-tensor flat indices of the trainable coordinates, plus the metadata that ties them to a model."""

    kind: str
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    indices: tuple[torch.Tensor | None, ...]  # sorted int64 flat indices; None = the whole tensor
    fingerprint: str  # of the model the mask was made for
    pretrain_grad: tuple[torch.Tensor, ...] | None = None  # masked mean pre-training gradient, float32
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        """Masked values per tensor."""
        return [math.prod(s) if i is None else int(i.numel()) for s, i in zip(self.shapes, self.indices)]

    @property
    def size(self) -> int:
        """Total number of masked values."""
        return sum(self.sizes)

    @property
    def scope_numel(self) -> int:
        """Number of weights in the tensors the mask covers."""
        return sum(math.prod(s) for s in self.shapes)

    def check(self, fingerprint: str, *, what: str = "mask") -> None:
        """Raise MaskMismatch unless this mask was made for the model with ``fingerprint``."""
        if fingerprint != self.fingerprint:
            raise MaskMismatch(
                f"this {what} was made for model {self.fingerprint}, not for the loaded model {fingerprint}"
            )


def scope_tensors(model: torch.nn.Module, scope: str = "linear") -> list[str]:
    """Names of the tensors a mask may cover, in ``named_parameters`` order.

    "linear": the weight of every ``nn.Linear`` inside the decoder blocks (q, k, v, o, gate, up, down),
    as the SensZOQ code does [code]; embeddings, norms and lm_head stay frozen. "all": every parameter.
    """
    if scope not in SCOPES:
        raise ConfigError(f"mask.scope must be one of {SCOPES}, got {scope!r}")
    if scope == "all":
        return [name for name, _ in model.named_parameters()]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise ConfigError("mask.scope='linear' needs a decoder with a `layers` list; use scope='all'")
    linear_weights = {id(m.weight) for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)}
    return [name for name, p in model.named_parameters() if id(p) in linear_weights]


def _check_density(density: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ConfigError(f"mask.density must be in (0, 1], got {density!r}")


def _top_k(scores: list[torch.Tensor], density: float, selection: str) -> list[torch.Tensor]:
    """Flat sorted indices of the largest scores: ``density`` of each tensor, or of all of them at once."""
    if selection not in SELECTIONS:
        raise ConfigError(f"mask.selection must be one of {SELECTIONS}, got {selection!r}")
    if selection == "per_tensor":
        out = []
        for s in scores:
            k = max(1, round(density * s.numel()))
            out.append(torch.topk(s.reshape(-1), k, sorted=False).indices.sort().values)
        return out
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = max(1, round(density * flat.numel()))
    chosen = torch.topk(flat, k, sorted=False).indices.sort().values
    out, start = [], 0
    for s in scores:
        end = start + s.numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, end]))
        out.append(chosen[lo:hi] - start)
        start = end
    return out


@torch.no_grad()
def _magnitude_scores(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().float().abs() for t in tensors]


def _random_scores(tensors: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(t.numel(), generator=generator) for t in tensors]


def pretraining_gradients(
    model: torch.nn.Module, names: Sequence[str], token_batches: Sequence[torch.Tensor], progress: Progress = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Causal-LM gradients on general text at the current weights, for the named tensors.

    Returns (mean of per-batch squared gradients, mean gradient), both float32 on the CPU. Uses
    backprop once, at mask-building time only; training never does. ``progress``: a bar over the batches.
    """
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    squared = [torch.zeros(p.shape, dtype=torch.float32) for p in chosen]
    mean = [torch.zeros(p.shape, dtype=torch.float32) for p in chosen]
    device = chosen[0].device
    batches = bar(len(token_batches), "calibration", "batch", progress)
    try:
        for batch in token_batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch).loss
            grads = torch.autograd.grad(loss, chosen)
            for sq, mu, g in zip(squared, mean, grads):
                g = g.detach().float().cpu()
                sq.add_(g * g)
                mu.add_(g)
            batches.update(1)
    finally:
        batches.close()
        for n, p in params.items():
            p.requires_grad_(flags[n])
    count = max(1, len(token_batches))
    return [s / count for s in squared], [m / count for m in mean]


def build_mask(
    model: torch.nn.Module,
    kind: str,
    density: float,
    *,
    fingerprint: str,
    scope: str = "linear",
    selection: str = "per_tensor",
    calibration: Sequence[torch.Tensor] = (),
    score: str = "fisher",
    seed: int = 0,
    meta: dict[str, str] | None = None,
    progress: Progress = False,
) -> Mask:
    """Build a mask of ``kind`` with ``density`` of the weights in ``scope``.

    sensitive: top-k of squared pre-training gradients on ``calibration`` token batches; ``score`` is
    "fisher" (mean of per-batch squared gradients, the default [choice]) or "grad_squared" (square of the
    mean gradient). random: uniform, from ``seed``. magnitude: largest |w|. dense: every weight in scope.
    """
    if kind not in KINDS:
        raise ConfigError(f"mask.kind must be one of {KINDS}, got {kind!r}")
    _check_density(density)
    if score not in SCORES:
        raise ConfigError(f"mask.score must be one of {SCORES}, got {score!r}")
    names = scope_tensors(model, scope)
    params = dict(model.named_parameters())
    tensors = [params[n] for n in names]
    info = {"density": repr(float(density)), "scope": scope, "selection": selection, **(meta or {})}
    pretrain_grad = None
    if kind == "dense":
        indices: list[torch.Tensor | None] = [None] * len(names)
        info["density"] = "1.0"
    elif kind == "sensitive":
        if not calibration:
            raise DataError("a sensitive mask needs calibration text (mask.calibration)")
        squared, mean = pretraining_gradients(model, names, calibration, progress)
        scores = squared if score == "fisher" else [m * m for m in mean]
        indices = list(_top_k(scores, density, selection))
        pretrain_grad = tuple(m.reshape(-1)[i] for m, i in zip(mean, indices))
        info["score"] = score
    elif kind == "random":
        indices = list(_top_k(_random_scores(tensors, seed), density, selection))
        info["seed"] = str(seed)
    else:
        indices = list(_top_k(_magnitude_scores(tensors), density, selection))
    return Mask(
        kind=kind,
        names=tuple(names),
        shapes=tuple(tuple(t.shape) for t in tensors),
        indices=tuple(indices),
        fingerprint=fingerprint,
        pretrain_grad=pretrain_grad,
        meta=info,
    )


def mask_tensors(mask: Mask, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Safetensors tensors and metadata describing ``mask`` (shared by mask and patch files)."""
    tensors: dict[str, torch.Tensor] = {}
    for i, idx in enumerate(mask.indices):
        if idx is not None:
            tensors[f"{prefix}indices.{i}"] = idx.to(torch.int64).contiguous()
    if mask.pretrain_grad is not None:
        for i, g in enumerate(mask.pretrain_grad):
            tensors[f"{prefix}pretrain_grad.{i}"] = g.float().contiguous()
    metadata = {
        "kind": mask.kind,
        "names": json.dumps(list(mask.names)),
        "shapes": json.dumps([list(s) for s in mask.shapes]),
        "whole": json.dumps([idx is None for idx in mask.indices]),
        "fingerprint": mask.fingerprint,
        "meta": json.dumps(mask.meta),
    }
    return tensors, metadata


def mask_from_tensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, prefix: str = ""
) -> Mask:
    """Inverse of ``mask_tensors``; validates everything (MaskMismatch names ``source``)."""
    try:
        names = json.loads(metadata["names"])
        shapes = [tuple(int(d) for d in s) for s in json.loads(metadata["shapes"])]
        whole = json.loads(metadata["whole"])
        meta = json.loads(metadata.get("meta", "{}"))
        kind, fingerprint = metadata["kind"], metadata["fingerprint"]
    except (KeyError, ValueError, TypeError) as exc:
        raise MaskMismatch(f"{source}: malformed mask metadata ({exc})") from None
    if not (len(names) == len(shapes) == len(whole)) or kind not in FILE_KINDS:
        raise MaskMismatch(f"{source}: inconsistent mask metadata")
    indices: list[torch.Tensor | None] = []
    for i, (shape, is_whole) in enumerate(zip(shapes, whole)):
        if is_whole:
            indices.append(None)
            continue
        idx = tensors.get(f"{prefix}indices.{i}")
        if idx is None or idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise MaskMismatch(f"{source}: missing or malformed indices for tensor {names[i]!r}")
        idx = idx.to(torch.int64)
        numel = math.prod(shape)
        if idx.numel() and (idx[0] < 0 or idx[-1] >= numel or bool((idx[1:] <= idx[:-1]).any())):
            raise MaskMismatch(f"{source}: indices for {names[i]!r} are not sorted, unique and in range")
        indices.append(idx)
    pretrain_grad = None
    if f"{prefix}pretrain_grad.0" in tensors:
        grads = [tensors.get(f"{prefix}pretrain_grad.{i}") for i in range(len(names))]
        sizes = [math.prod(s) if i is None else i.numel() for s, i in zip(shapes, indices)]
        if any(g is None or g.numel() != n or not torch.isfinite(g).all() for g, n in zip(grads, sizes)):
            raise MaskMismatch(f"{source}: malformed pre-training gradient")
        pretrain_grad = tuple(g.float() for g in grads)
    return Mask(kind, tuple(names), tuple(shapes), tuple(indices), fingerprint, pretrain_grad, meta)


def save_mask(mask: Mask, path: str | Path) -> Path:
    """Write ``mask`` to a safetensors file (indices, pre-training gradient, metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = mask_tensors(mask)
    if not tensors:  # safetensors needs at least one tensor
        tensors["empty"] = torch.zeros(0)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": MASK_FORMAT, **metadata})
    tmp.replace(path)
    return path


def read_safetensors(path: str | Path, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a meerkat safetensors file; MaskMismatch names the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise MaskMismatch(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MaskMismatch(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != expected_format:
        raise MaskMismatch(f"{path}: expected a {expected_format} file, found format {metadata.get('format')!r}")
    return tensors, metadata


def load_mask(path: str | Path, fingerprint: str | None = None) -> Mask:
    """Read a mask file; with ``fingerprint``, also check it was made for that model."""
    tensors, metadata = read_safetensors(path, MASK_FORMAT)
    mask = mask_from_tensors(tensors, metadata, str(path))
    if fingerprint is not None:
        mask.check(fingerprint, what=f"mask {path}")
    return mask


def calibration_batches(
    tokenizer, path: str | Path, *, num_sequences: int = 32, seq_len: int = 128, batch_size: int = 8
) -> list[torch.Tensor]:
    """Token batches [batch_size, seq_len] of general text from a text file (or a folder of .txt files).

    WikiText's tokenisation artefacts (`` @-@ `` etc.) are undone; ``<unk>`` is kept as plain text.
    """
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"calibration text {path}: no such file or no .txt files in the folder")
    text = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(a, b)
    needed = num_sequences * seq_len
    ids: list[int] = []
    for start in range(0, len(text), 200_000):  # tokenise only as much as needed
        ids.extend(tokenizer(text[start : start + 200_000], add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    if len(ids) < seq_len:
        raise DataError(f"calibration text {path}: only {len(ids)} tokens, need at least {seq_len}")
    usable = min(needed, len(ids) // seq_len * seq_len)
    sequences = torch.tensor(ids[:usable], dtype=torch.int64).view(-1, seq_len)
    return list(sequences.split(batch_size))
