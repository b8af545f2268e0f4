"""Patches: save, load, apply over a fresh base model; refuse the wrong base model."""

import pytest
import torch

from meerkat_fl.errors import MaskMismatch
from meerkat_fl.masks import build_mask
from meerkat_fl.models import tiny_llama
from meerkat_fl.patch import apply_patch, load_patch, save_patch
from meerkat_fl.zo import MaskedParams, apply_step


def test_patch_round_trip_reproduces_the_trained_model(tmp_path):
    trained = tiny_llama(0)
    mask = build_mask(trained.model, "random", 0.01, fingerprint=trained.fingerprint)
    params = MaskedParams(trained.model, mask)
    values = params.gather()
    apply_step(values, mask, seed=3, scalar=5.0, lr=0.1, noise=params.noise)
    params.write(values)
    path = save_patch(tmp_path / "p.safetensors", mask, values, {"task": "x"})

    fresh = tiny_llama(0)
    patch = load_patch(path)
    apply_patch(fresh.model, patch, fresh.fingerprint)
    for (n, a), (_, b) in zip(trained.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(a, b), n
    assert patch.meta == {"task": "x"}


def test_patch_for_another_base_model_is_refused(tmp_path):
    a, b = tiny_llama(0), tiny_llama(1)
    mask = build_mask(a.model, "random", 0.01, fingerprint=a.fingerprint)
    path = save_patch(tmp_path / "p.safetensors", mask, MaskedParams(a.model, mask).gather())
    with pytest.raises(MaskMismatch, match="patch"):
        apply_patch(b.model, load_patch(path), b.fingerprint)


def test_patch_with_nan_values_is_refused(tmp_path):
    a = tiny_llama(0)
    mask = build_mask(a.model, "random", 0.01, fingerprint=a.fingerprint)
    values = MaskedParams(a.model, mask).gather()
    values[0] = float("nan")
    path = save_patch(tmp_path / "p.safetensors", mask, values)
    with pytest.raises(MaskMismatch, match="NaN"):
        load_patch(path)
