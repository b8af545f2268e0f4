"""Sparse patches: the result of fine-tuning, as (indices, values) per tensor over a base model.

A patch file is a mask file's indices plus the trained float32 values of those coordinates, and the
fingerprint of the base model. Applying it writes the values into a freshly loaded base model. A dense
patch is the same format with whole tensors. A LoRA patch (mask kind "lora") holds every adapter weight
whole, plus the LoRA settings: applying it first injects matching adapters (PEFT), then writes the values;
``merge_patch`` folds the adapters into the base weights (PEFT's ``merge_and_unload``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from meerkat_fl.errors import MaskMismatch
from meerkat_fl.lora import inject_lora, lora_settings
from meerkat_fl.masks import Mask, mask_from_tensors, mask_tensors, read_safetensors
from meerkat_fl.paths import output_folder
from meerkat_fl.zo import MaskedParams

PATCH_FORMAT = "meerkat-patch/1"


@dataclass(frozen=True)
class Patch:
    """Trained values of a mask's coordinates over the base model with ``mask.fingerprint``."""

    mask: Mask
    values: torch.Tensor  # float32, mask.size values in canonical order
    meta: dict[str, str] = field(default_factory=dict)


def save_patch(path: str | Path, mask: Mask, values: torch.Tensor, meta: dict[str, str] | None = None) -> Path:
    """Write a patch file; ``values`` are the masked values (float32) to apply over the base model."""
    if values.numel() != mask.size:
        raise ValueError(f"patch values have {values.numel()} entries, the mask has {mask.size}")
    bare = Mask(mask.kind, mask.names, mask.shapes, mask.indices, mask.fingerprint, None, dict(mask.meta))
    tensors, metadata = mask_tensors(bare, prefix="mask.")
    offset = 0
    for i, n in enumerate(mask.sizes):
        tensors[f"values.{i}"] = values[offset : offset + n].detach().float().cpu().contiguous()
        offset += n
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": PATCH_FORMAT, "patch_meta": json.dumps(meta or {}), **metadata})
    tmp.replace(path)
    return path


def load_patch(path: str | Path) -> Patch:
    """Read and validate a patch file (MaskMismatch names the file on any problem)."""
    tensors, metadata = read_safetensors(path, PATCH_FORMAT)
    mask = mask_from_tensors(tensors, metadata, str(path), prefix="mask.")
    parts = []
    for i, n in enumerate(mask.sizes):
        part = tensors.get(f"values.{i}")
        if part is None or part.numel() != n:
            raise MaskMismatch(f"{path}: values for tensor {mask.names[i]!r} are missing or the wrong size")
        parts.append(part.float().reshape(-1))
    values = torch.cat(parts) if parts else torch.zeros(0)
    if not torch.isfinite(values).all():
        raise MaskMismatch(f"{path}: patch values contain NaN or inf")
    try:
        meta = json.loads(metadata.get("patch_meta", "{}"))
    except ValueError:
        meta = {}
    return Patch(mask=mask, values=values, meta=meta)


def apply_patch(model: torch.nn.Module, patch: Patch, fingerprint: str) -> None:
    """Write the patch into ``model`` in place; refuses a patch made for another base model.

    A LoRA patch injects its adapters into ``model`` first (in place; ``model`` must not carry adapters yet).
    """
    patch.mask.check(fingerprint, what="patch")
    if patch.mask.kind == "lora":
        inject_lora(model, **lora_settings(patch.mask))
    _write(model, patch)


def merge_patch(model: torch.nn.Module, patch: Patch, fingerprint: str) -> torch.nn.Module:
    """A plain model (no adapter layers) holding the patch in its base weights: a LoRA patch is merged
    (W + alpha/rank * B A, by PEFT's ``merge_and_unload``); any other patch is just applied to ``model``."""
    patch.mask.check(fingerprint, what="patch")
    if patch.mask.kind != "lora":
        _write(model, patch)
        return model
    wrapper = inject_lora(model, **lora_settings(patch.mask))
    _write(model, patch)
    return wrapper.merge_and_unload()


def export_merged(model: torch.nn.Module, tokenizer, patch: Patch, fingerprint: str, out: str | Path, *,
                  overwrite: bool = False) -> Path:
    """Save the base model with the patch merged in as a Hugging Face model folder (``save_pretrained``),
    loadable by ``meerkat eval --model DIR`` or any transformers code. ``out`` must be new or empty unless
    ``overwrite`` (then files of the same names are replaced; ConfigError otherwise)."""
    out = output_folder(out, "export folder", overwrite=overwrite)
    merged = merge_patch(model, patch, fingerprint)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _write(model: torch.nn.Module, patch: Patch) -> None:
    params = MaskedParams(model, patch.mask)
    params.write(patch.values.to(params.device))
