"""The fused Rademacher pass: the bits of the eager draw and of the NumPy reference, compiled or not, and the
dense ZO step and server replay that use it."""

import logging
import shutil

import numpy as np
import pytest
import torch

from meerkat_fl import noise, noise_fused, noise_reference
from meerkat_fl.local import DataPointer, local_train
from meerkat_fl.masks import build_mask
from meerkat_fl.noise import NoiseSource, segment_seed
from meerkat_fl.zo import MaskedParams, fused_write, replay

FUSED = NoiseSource("philox", "rademacher")
UNFUSED = NoiseSource("philox", "rademacher", fused=False)


def reference(values: torch.Tensor, key: int, coefficient: float) -> np.ndarray:
    """fl32(v + fl32(c) * z) with z from the NumPy reference of philox/rademacher."""
    z = noise_reference.segment("rademacher", key, values.numel())
    return values.numpy() + np.float32(coefficient) * z


def bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.int32)


@pytest.fixture
def eager(monkeypatch):
    """Run the fused kernels without compiling (the same functions, eagerly): no compile time in unit tests."""
    monkeypatch.setattr(noise_fused, "COMPILE", False)


@pytest.mark.parametrize("size", [1, 31, 32, 33, 127, 129, 300, 1000, 5003])
@pytest.mark.parametrize("seed,position,coefficient", [(0, 0, 1e-3), (7, 3, -2.5e-7), (2**62 + 5, 11, 0.3)])
def test_eager_fused_pass_equals_the_reference_across_chunks_and_tails(eager, monkeypatch, size, seed, position,
                                                                       coefficient):
    monkeypatch.setattr(noise_fused, "CHUNK", 256)  # many chunks: counters start at block offsets 0, 2, 4, ...
    key = segment_seed(seed, position)
    values = torch.randn(size, generator=torch.Generator().manual_seed(size))
    out = torch.full_like(values, float("nan"))
    noise_fused.add_rademacher(out, values, key, coefficient)
    assert np.array_equal(bits(out), bits(reference(values, key, coefficient)))
    FUSED.add_noise(values, values, seed, position, coefficient)  # in place, through the source
    assert torch.equal(values, out)


def test_the_kernels_run_eagerly_give_the_reference_bits():
    key, size = segment_seed(3, 4), 64 * 128
    values = torch.randn(size, generator=torch.Generator().manual_seed(2))
    out = torch.empty(size // 32, 32)  # the function torch.compile compiles, run as plain torch
    noise_fused.add_chunk(out, values.view(-1, 32), torch.tensor(key & 0xFFFFFFFF), torch.tensor(key >> 32),
                          torch.tensor(0), torch.tensor(-7e-4, dtype=torch.float32))
    assert np.array_equal(bits(out.view(-1)), bits(reference(values, key, -7e-4)))


def test_the_fused_pass_has_the_bits_of_drawing_z_and_adding_it(eager):
    values = torch.randn(70_001, generator=torch.Generator().manual_seed(1))
    drawn = values.clone()
    UNFUSED.add_scaled(drawn, UNFUSED.segment(5, 2, values.numel()), 1e-4)
    FUSED.add_noise(values, values, 5, 2, 1e-4)
    assert torch.equal(values, drawn)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="no C++ compiler for torch.compile")
def test_compiled_fused_pass_equals_the_reference(monkeypatch):
    # small chunks keep the compile to one symbolic-shape graph per kernel and the check fast
    monkeypatch.setattr(noise_fused, "CHUNK", 1 << 13)
    monkeypatch.setattr(noise_fused, "COMPILE_MIN", 1 << 12)
    for size, seed in [(2 * (1 << 13) + 4096 + 37, 3), ((1 << 13) + 5000, 2**61 + 1)]:
        key = segment_seed(seed, 1)
        values = torch.randn(size, generator=torch.Generator().manual_seed(seed))
        out = torch.empty_like(values)
        noise_fused.add_rademacher(out, values, key, -3e-3)
        assert np.array_equal(bits(out), bits(reference(values, key, -3e-3)))
        noise_fused.add_rademacher(values, values, key, -3e-3)  # in place: another aliasing, same bits
        assert torch.equal(values, out)
    assert noise_fused.compile_failed() is None


def test_a_failed_compile_warns_once_and_falls_back_to_the_same_bits(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no working C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(noise_fused, "_compiled", {})
    monkeypatch.setattr(noise_fused, "_failed", [])
    monkeypatch.setattr(noise_fused, "COMPILE_MIN", 16)
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    out = torch.empty_like(values)
    with caplog.at_level(logging.WARNING, logger="meerkat_fl.noise_fused"):
        noise_fused.add_rademacher(out, values, 99, 0.5)
        noise_fused.add_rademacher(out, values, 99, 0.5)
    assert np.array_equal(bits(out), bits(reference(values, 99, 0.5)))
    assert len([r for r in caplog.records if "torch.compile" in r.getMessage()]) == 1
    assert "no working C++ compiler" in noise_fused.compile_failed()


def test_only_large_philox_rademacher_segments_fuse():
    big = noise_fused.FUSE_MIN
    assert FUSED.fuses(big) and not FUSED.fuses(big - 1) and not UNFUSED.fuses(big)
    assert not NoiseSource("philox", "gaussian").fuses(big) and not NoiseSource("torch_cpu", "rademacher").fuses(big)


@pytest.fixture
def dense(tiny, eager, monkeypatch):
    """The tiny model's dense mask with every tensor of 1024+ values on the fused path, written per tensor."""
    monkeypatch.setattr(noise_fused, "FUSE_MIN", 1024)
    monkeypatch.setattr(noise, "FLAT_LIMIT", 0)
    mask = build_mask(tiny.model, "dense", 1.0, fingerprint=tiny.fingerprint, scope="all")
    start = MaskedParams(tiny.model, mask).gather()
    yield mask, start
    MaskedParams(tiny.model, mask).write(start)


def train(tiny, mask, start, source, steps: int, lr: float):
    params = MaskedParams(tiny.model, mask, noise=source)
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss(rows=None) -> float:
        with torch.no_grad():
            return float(tiny.model(input_ids=ids, labels=ids).loss)

    values = start.clone()
    params.write(values)
    before = loss()
    seeds = list(range(100, 100 + steps))
    path = local_train(params, values, seeds, lr=lr, eps=1e-3, batch_loss=loss, pointer=DataPointer(4, seed=0),
                       batch_size=4)
    return values, [(s.seed, s.scalar) for s in path], before, loss()


def test_dense_fused_steps_lower_the_training_loss(tiny, dense):
    mask, start = dense
    assert sum(FUSED.fuses(n) for n in mask.sizes) >= 10  # the embedding and every 2D weight
    _, _, before, after = train(tiny, mask, start, FUSED, steps=40, lr=3e-3)
    assert after < before - 0.05, (before, after)


def test_fused_client_path_equals_the_unfused_one_and_server_replay_is_exact(tiny, dense):
    mask, start = dense
    values, path, _, _ = train(tiny, mask, start, FUSED, steps=4, lr=3e-3)
    unfused_values, unfused_path, _, _ = train(tiny, mask, start, UNFUSED, steps=4, lr=3e-3)
    assert unfused_path == path and torch.equal(unfused_values, values)  # perturbed writes and updates alike
    for server_noise in (FUSED, UNFUSED):
        assert torch.equal(replay(start, mask, path, 3e-3, noise=server_noise), values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_write_into_a_model_tensor_rounds_as_the_unfused_write(eager, dtype):
    values = torch.randn(48 * 64, generator=torch.Generator().manual_seed(4))
    tensor = torch.zeros(48, 64, dtype=dtype)
    fused_write(tensor, values, FUSED, 9, 2, -1e-2)
    z = UNFUSED.segment(9, 2, values.numel())
    assert torch.equal(tensor, (z.mul_(-1e-2).add_(values)).to(dtype).view(48, 64))
