"""LoRA-FedZO: zeroth-order training of LoRA adapters (injected with PEFT) instead of a mask of base weights.

The adapters become the trainable coordinates through an ordinary ``Mask`` of kind "lora": dense (whole
tensors) over every ``lora_A`` and ``lora_B`` weight, in ``named_parameters`` order, and nothing else. So the
ZO core, the federated client/server/strategies, replay, checkpoints, byte accounting and patches work on
the adapters unchanged, and ZO perturbs both A and B, as MeZO-LoRA does. The base weights are never written.

Every party builds identical adapters: B is zero (PEFT's init, so training starts at the base model) and A is
drawn here, per tensor, from a CPU generator seeded by (run seed, tensor position) with PEFT's distribution
(kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) [choice: not PEFT's own draw from the
global RNG, so the values depend neither on the global RNG nor on the device nor on PEFT's internals].
The mask keeps the base model's fingerprint, so a LoRA patch is refused on another base model.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from meerkat_fl.errors import ConfigError, MaskMismatch
from meerkat_fl.masks import Mask

if TYPE_CHECKING:
    from peft import PeftModel

# [choice] q and v projections, as MeZO's LoRA runs and LoRA-FedZO use; the paper does not say.
DEFAULT_TARGETS = ("q_proj", "v_proj")
ADAPTER = "default"  # PEFT's adapter name; one adapter per model
_INIT_TAG = 0x10_4A  # separates the adapter-init seeds from every other seed derived from the run seed


def adaptable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``nn.Linear`` modules adapters may go on, by module name: those inside the decoder blocks and the
    output head (tasks score through the model's own forward, so an adapter on the head changes the loss),
    unless the head shares its weight with the input embeddings: merging an adapter into a tied weight
    (``meerkat export``) would change the embeddings too."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks = getattr(decoder, "layers", None)
    if blocks is None:
        raise ConfigError("mask.kind='lora' needs a decoder with a `layers` list of blocks")
    inside = {id(m) for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(head, torch.nn.Linear) and (embeddings is None or head.weight is not embeddings.weight):
        inside.add(id(head))
    return {name: m for name, m in model.named_modules() if id(m) in inside}


def resolve_targets(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module names of the decoder-block linears that ``targets`` name (PEFT's rule: a module matches
    a target equal to its name or to a dotted suffix of it). ConfigError for a target that matches nothing."""
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"lora.targets: must be a non-empty list of module names, got {targets!r}")
    linears = list(adaptable_linears(model))
    chosen: list[str] = []
    for target in targets:
        if not isinstance(target, str) or not target.strip("."):
            raise ConfigError(f"lora.targets: {target!r} is not a module name")
        matched = [name for name in linears if name == target or name.endswith("." + target)]
        if not matched:
            known = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ConfigError(f"lora.targets: {target!r} matches no linear module in the decoder blocks or an untied head "
                              f"(they are named {', '.join(known)})")
        chosen.extend(m for m in matched if m not in chosen)
    return sorted(chosen, key=linears.index)


def _check_settings(rank: int, alpha: float) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"lora.rank: must be an integer > 0, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora.alpha: must be > 0, got {alpha!r}")


def lora_layers(model: torch.nn.Module) -> list[Any]:
    """PEFT's LoRA layers inside ``model`` (empty for a plain model)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of every LoRA A and B weight in ``model``, in ``named_parameters`` order."""
    layers = lora_layers(model)
    adapters = {id(m[ADAPTER].weight) for layer in layers for m in (layer.lora_A, layer.lora_B)}
    return [name for name, p in model.named_parameters() if id(p) in adapters]


def init_seed(seed: int, position: int) -> int:
    """Generator seed of the ``position``-th A matrix (in parameter order) for run seed ``seed``."""
    return int(np.random.SeedSequence([seed, _INIT_TAG, position]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def _init_a(model: torch.nn.Module, seed: int) -> None:
    a_weights = {id(layer.lora_A[ADAPTER].weight) for layer in lora_layers(model)}
    position = 0
    for _, weight in model.named_parameters():
        if id(weight) not in a_weights:
            continue
        generator = torch.Generator(device="cpu").manual_seed(init_seed(seed, position))
        bound = 1.0 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [rank, in_features]
        values = torch.rand(tuple(weight.shape), generator=generator, dtype=torch.float32)
        weight.copy_(values.mul_(2 * bound).sub_(bound))
        position += 1


def inject_lora(
    model: torch.nn.Module, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
) -> PeftModel:
    """Inject LoRA adapters into ``model`` in place (PEFT's ``get_peft_model``) and return PEFT's wrapper.

    ``model`` itself keeps working (its target linears now carry adapters) and stays frozen and in eval mode.
    A is drawn from ``seed`` (module docstring), B is zero. The wrapper is what ``merge_and_unload`` needs.
    """
    import peft

    _check_settings(rank, alpha)
    if has_lora(model):
        raise ConfigError("this model already carries LoRA adapters; load a fresh base model")
    modules = resolve_targets(model, targets)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules, lora_dropout=0.0,
                             bias="none", init_lora_weights=True)
    training = model.training
    # PEFT's own init draws from the global RNG (A is redrawn below): leave the caller's RNG state alone
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        wrapper = peft.get_peft_model(model, config)
    _init_a(model, seed)
    model.requires_grad_(False)  # ZO needs no autograd graph; PEFT marked the adapters trainable
    model.train(training)
    return wrapper


def lora_mask(
    model: torch.nn.Module, *, fingerprint: str, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
) -> Mask:
    """The "lora" mask of a model that carries adapters: every A and B weight, whole; the settings in meta."""
    params = dict(model.named_parameters())
    names = adapter_names(model)
    if not names:
        raise ConfigError("the model carries no LoRA adapters")
    meta = {
        "density": "1.0", "rank": str(rank), "alpha": repr(float(alpha)),
        "targets": json.dumps(list(targets)), "init_seed": str(seed), "adapted_modules": str(len(names) // 2),
    }
    return Mask(kind="lora", names=tuple(names), shapes=tuple(tuple(params[n].shape) for n in names),
                indices=(None,) * len(names), fingerprint=fingerprint, meta=meta)


def add_lora(
    model: torch.nn.Module, *, fingerprint: str, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
) -> Mask:
    """Inject adapters into ``model`` (in place) and return the mask over them: what every LoRA-FedZO party
    builds."""
    inject_lora(model, rank=rank, alpha=alpha, targets=targets, seed=seed)
    return lora_mask(model, fingerprint=fingerprint, rank=rank, alpha=alpha, targets=targets, seed=seed)


def lora_settings(mask: Mask) -> dict[str, Any]:
    """The (rank, alpha, targets) a "lora" mask or patch was made with, to inject matching ones (a patch from
    before ``lora.dropout`` was removed also carries a dropout, which never applied and is ignored)."""
    meta = mask.meta
    try:
        settings = {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]),
                    "targets": tuple(json.loads(meta["targets"]))}
    except (KeyError, ValueError, TypeError) as exc:
        raise MaskMismatch(f"LoRA mask metadata is missing or malformed ({exc})") from None
    return settings
