"""Masks: per-tensor and global top-k, random, magnitude, dense; files; model fingerprint checks."""

import pytest
import torch

from meerkat_fl.errors import ConfigError, DataError, MaskMismatch
from meerkat_fl.masks import (
    build_mask,
    calibration_batches,
    load_mask,
    pretraining_gradients,
    save_mask,
    scope_tensors,
)


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2000, (2, 16), generator=gen) for _ in range(2)]


def test_linear_scope_is_the_block_linear_weights(tiny):
    names = scope_tensors(tiny.model, "linear")
    params = dict(tiny.model.named_parameters())
    assert len(names) == 7 * tiny.model.config.num_hidden_layers
    assert all(params[n].dim() == 2 for n in names)
    assert "model.embed_tokens.weight" not in names


def test_per_tensor_sensitive_mask_picks_exactly_the_largest_squared_gradients(tiny, calib):
    density = 0.05
    mask = build_mask(tiny.model, "sensitive", density, fingerprint=tiny.fingerprint, calibration=calib)
    squared, mean = pretraining_gradients(tiny.model, mask.names, calib)
    for score, idx, grad in zip(squared, mask.indices, mask.pretrain_grad):
        flat = score.reshape(-1)
        assert idx.numel() == round(density * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        chosen[idx] = True
        assert flat[chosen].min() >= flat[~chosen].max()
    # the stored pre-training gradient is the masked *mean* gradient
    for m, idx, grad in zip(mean, mask.indices, mask.pretrain_grad):
        assert torch.equal(m.reshape(-1)[idx], grad)


def test_global_selection_keeps_the_total_density(tiny, calib):
    mask = build_mask(tiny.model, "magnitude", 0.02, fingerprint=tiny.fingerprint, selection="global")
    assert mask.size == round(0.02 * mask.scope_numel)
    params = dict(tiny.model.named_parameters())
    chosen_min = min(float(params[n].abs().reshape(-1)[i].min()) for n, i in zip(mask.names, mask.indices) if i.numel())
    unchosen_max = 0.0
    for n, i in zip(mask.names, mask.indices):
        keep = torch.ones(params[n].numel(), dtype=torch.bool)
        keep[i] = False
        unchosen_max = max(unchosen_max, float(params[n].abs().reshape(-1)[keep].max()))
    assert chosen_min >= unchosen_max


def test_magnitude_mask_picks_largest_weights_per_tensor(tiny):
    mask = build_mask(tiny.model, "magnitude", 0.01, fingerprint=tiny.fingerprint)
    params = dict(tiny.model.named_parameters())
    for name, idx in zip(mask.names, mask.indices):
        w = params[name].abs().reshape(-1)
        assert idx.numel() == round(0.01 * w.numel())
        assert w[idx].min() >= torch.topk(w, idx.numel()).values.min()


def test_random_mask_is_seeded_with_the_requested_density(tiny):
    a = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=1)
    b = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=1)
    c = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(torch.equal(x, y) for x, y in zip(a.indices, c.indices))
    for idx, shape in zip(a.indices, a.shapes):
        assert idx.numel() == round(0.01 * shape[0] * shape[1])
        assert torch.equal(idx, idx.unique())


def test_dense_mask_covers_everything(tiny):
    mask = build_mask(tiny.model, "dense", 1.0, fingerprint=tiny.fingerprint, scope="all")
    assert mask.size == sum(p.numel() for p in tiny.model.parameters())


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_outside_unit_interval_is_rejected(tiny, density):
    with pytest.raises(ConfigError, match="density"):
        build_mask(tiny.model, "random", density, fingerprint=tiny.fingerprint)


def test_sensitive_mask_without_calibration_text_is_an_error(tiny):
    with pytest.raises(DataError, match="calibration"):
        build_mask(tiny.model, "sensitive", 0.01, fingerprint=tiny.fingerprint)


def test_mask_file_round_trip(tiny, calib, tmp_path):
    mask = build_mask(tiny.model, "sensitive", 0.01, fingerprint=tiny.fingerprint, calibration=calib,
                      meta={"calibration": "synthetic"})
    path = save_mask(mask, tmp_path / "m.safetensors")
    loaded = load_mask(path, tiny.fingerprint)
    assert loaded.names == mask.names and loaded.shapes == mask.shapes and loaded.kind == "sensitive"
    assert all(torch.equal(a, b) for a, b in zip(loaded.indices, mask.indices))
    assert all(torch.equal(a, b) for a, b in zip(loaded.pretrain_grad, mask.pretrain_grad))
    assert loaded.meta["calibration"] == "synthetic" and loaded.meta["density"] == repr(0.01)


def test_mask_for_another_model_is_a_clear_error(tiny, tmp_path):
    mask = build_mask(tiny.model, "random", 0.01, fingerprint="someothermodel00")
    path = save_mask(mask, tmp_path / "m.safetensors")
    with pytest.raises(MaskMismatch, match="someothermodel00"):
        load_mask(path, tiny.fingerprint)


def test_corrupt_mask_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MaskMismatch, match="bad.safetensors"):
        load_mask(bad)
    with pytest.raises(MaskMismatch, match="no such file"):
        load_mask(tmp_path / "missing.safetensors")


def test_calibration_batches_from_a_text_file(tiny, tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("The quick brown fox @-@ jumps over the lazy dog . " * 200)
    batches = calibration_batches(tiny.tokenizer, text, num_sequences=6, seq_len=16, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 16), (2, 16)]
    with pytest.raises(DataError, match="missing.txt"):
        calibration_batches(tiny.tokenizer, tmp_path / "missing.txt")
