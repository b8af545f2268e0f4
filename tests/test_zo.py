"""The zeroth-order core: seeded noise, exact perturb/restore, exact replay, dense streaming."""

import math

import numpy as np
import pytest
import torch

from meerkat_fl.local import DataPointer, local_train, step_seeds
from meerkat_fl.masks import build_mask
from meerkat_fl.noise import LEGACY, NoiseSource
from meerkat_fl.zo import MaskedParams, apply_step, noise, replay, segment_noise, wants_noise_cache, zo_step

# every exactness test runs with the historical generator and with Philox (both kinds)
SOURCES = [LEGACY, NoiseSource("philox", "gaussian"), NoiseSource("philox", "rademacher")]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model, snap):
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


@pytest.fixture(params=SOURCES, ids=lambda s: s.name)
def sparse(tiny, request):
    mask = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=3)
    params = MaskedParams(tiny.model, mask, noise=request.param)
    yield mask, params
    params.write(params.gather())


def lm_loss(model, ids):
    def loss():
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    return loss


def test_same_seed_gives_identical_noise(sparse):
    mask, params = sparse
    z = lambda seed: noise(seed, mask, source=params.noise)
    assert torch.equal(z(7), z(7))
    assert not torch.equal(z(7), z(8))
    assert z(7).shape == (mask.size,)


def test_noise_has_mean_zero_and_unit_variance(sparse):
    mask, params = sparse
    z = noise(11, mask, source=params.noise).double()
    bound = 4.0 / math.sqrt(z.numel())  # 4 standard errors (the million-draw checks are in test_noise.py)
    assert abs(float(z.mean())) < bound and abs(float(z.std()) - 1.0) < 2 * bound


def test_perturb_and_restore_leave_weights_bit_identical(tiny, sparse):
    _, params = sparse
    before = snapshot(tiny.model)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    step = zo_step(lm_loss(tiny.model, ids), params, params.gather(), seed=5, eps=1e-3)
    assert same_weights(tiny.model, before)
    assert math.isfinite(step.scalar) and step.scalar != 0.0


def test_step_only_changes_masked_coordinates(tiny, sparse):
    mask, params = sparse
    before = snapshot(tiny.model)
    values = params.gather()
    start = values.clone()
    apply_step(values, mask, seed=1, scalar=2.0, lr=0.1, noise=params.noise)
    params.write(values)
    changed_weights = snapshot(tiny.model)
    params.write(start)  # the tiny model is shared by the whole session: put it back
    assert same_weights(tiny.model, before)
    assert any((changed_weights[name] != before[name]).any() for name in mask.names)
    masked_names = set(mask.names)
    for name, p in changed_weights.items():
        changed = (p != before[name]).reshape(-1)
        if name not in masked_names:
            assert not changed.any(), name
        else:
            idx = mask.indices[mask.names.index(name)]
            outside = torch.ones_like(changed)
            outside[idx] = False
            assert not (changed & outside).any(), name


def test_replaying_seed_scalar_pairs_reproduces_a_trained_path_exactly(tiny, sparse):
    mask, params = sparse
    start = params.gather()
    ids = torch.randint(0, 1000, (16, 10), generator=torch.Generator().manual_seed(1))

    def batch_loss(rows):
        batch = ids[torch.as_tensor(rows)]
        return lm_loss(tiny.model, batch)()

    values = start.clone()
    steps = local_train(params, values, step_seeds(0, 0, 0, 5), lr=1e-2, eps=1e-3,
                        batch_loss=batch_loss, pointer=DataPointer(16, seed=0), batch_size=4)
    assert not torch.equal(values, start)
    replayed = replay(start, mask, [(s.seed, s.scalar) for s in steps], lr=1e-2, noise=params.noise)
    assert torch.equal(replayed, values)
    assert torch.equal(params.gather(), values)  # the model holds the trained values
    params.write(start)  # the tiny model is shared by the whole session: put it back


def test_non_finite_loss_skips_the_step_and_keeps_weights(tiny, sparse):
    _, params = sparse
    before = snapshot(tiny.model)
    values = params.gather()
    steps = local_train(params, values, [1, 2], lr=1.0, eps=1e-3,
                        batch_loss=lambda rows: float("nan"), pointer=DataPointer(4, seed=0), batch_size=2)
    assert all(s.skipped and s.scalar == 0.0 for s in steps)
    assert same_weights(tiny.model, before)


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_dense_mask_is_the_same_code_and_streams_per_tensor(tiny, source):
    mask = build_mask(tiny.model, "dense", 1.0, fingerprint=tiny.fingerprint, scope="all")
    params = MaskedParams(tiny.model, mask, noise=source)
    assert params.size == sum(p.numel() for p in tiny.model.parameters())
    before = snapshot(tiny.model)
    values = params.gather()
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(2))
    step = zo_step(lm_loss(tiny.model, ids), params, values, seed=3, eps=1e-3)
    assert same_weights(tiny.model, before)
    streamed = values.clone()
    apply_step(streamed, mask, step.seed, step.scalar, 1e-3, noise=source)
    expected = values.clone()
    source.add_scaled(expected, noise(step.seed, mask, source=source), -1e-3 * step.scalar)
    assert torch.equal(streamed, expected)


def test_zo_estimate_points_along_the_true_gradient():
    # f(w) = 0.5 * ||A w - b||^2 on a Linear layer; E[g z] equals the gradient (SPSA is unbiased to O(eps^2)).
    layer = torch.nn.Linear(8, 1, bias=False)
    torch.nn.init.constant_(layer.weight, 0.3)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

    model = Wrapper()
    mask = build_mask(model, "dense", 1.0, fingerprint="x", scope="all")
    params = MaskedParams(model, mask)
    a = torch.linspace(-1, 1, 32).reshape(4, 8)
    b = torch.ones(4, 1)

    def loss():
        with torch.no_grad():
            return float(0.5 * ((layer(a) - b) ** 2).sum())

    w = params.gather()
    estimate = torch.zeros_like(w)
    for seed in range(400):
        step = zo_step(loss, params, w, seed, eps=1e-3)
        estimate += step.scalar * noise(seed, mask) / 400
    w_req = layer.weight.detach().clone().requires_grad_(True)
    (0.5 * ((a @ w_req.T - b) ** 2).sum()).backward()
    true = w_req.grad.reshape(-1)
    cosine = float(torch.nn.functional.cosine_similarity(estimate, true, dim=0))
    assert cosine > 0.9


def test_data_pointer_walks_every_example_once_per_epoch():
    pointer = DataPointer(10, seed=4)
    first = np.concatenate([pointer.next_batch(3) for _ in range(3)] + [pointer.next_batch(1)])
    assert sorted(first.tolist()) == list(range(10))
    assert pointer.state() == {"epoch": 1, "position": 0}
    resumed = DataPointer(10, seed=4)
    resumed.load_state({"epoch": 1, "position": 0})
    assert np.array_equal(resumed.next_batch(4), pointer.next_batch(4))


def test_segment_noise_is_a_standard_gaussian_fixed_by_seed_and_position():
    # Same (seed, position): the same values, so server and clients agree; any other pair: other values.
    z = segment_noise(1, 0, 20_000)
    assert z.dtype == torch.float32 and torch.equal(z, segment_noise(1, 0, 20_000))
    for other in (segment_noise(2, 0, 20_000), segment_noise(1, 1, 20_000)):
        assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.03
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03


@pytest.mark.parametrize("source", SOURCES[:2], ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["dense", "random"])
def test_noise_cache_is_bit_identical_and_released(tiny, kind, source):
    # The cache only saves regenerating the step's noise: scalars, values and replay agree bit for bit.
    mask = build_mask(tiny.model, kind, 1.0 if kind == "dense" else 0.05, fingerprint=tiny.fingerprint,
                      scope="all", seed=1)
    ids = torch.randint(0, 1000, (8, 8), generator=torch.Generator().manual_seed(4))

    def batch_loss(rows):
        return lm_loss(tiny.model, ids[torch.as_tensor(rows)])()

    results = []
    for cache in (False, True):
        params = MaskedParams(tiny.model, mask, cache_noise=cache, noise=source)
        start = params.gather()
        values = start.clone()
        steps = local_train(params, values, step_seeds(0, 1, 2, 4), lr=1e-2, eps=1e-3,
                            batch_loss=batch_loss, pointer=DataPointer(8, seed=0), batch_size=4)
        assert params._cached is None  # forgotten when the local steps end
        results.append((values, [s.scalar for s in steps]))
        params.write(start)
    (plain, plain_scalars), (cached, cached_scalars) = results
    assert plain_scalars == cached_scalars and any(plain_scalars)
    assert torch.equal(plain, cached)
    path = list(zip(step_seeds(0, 1, 2, 4), cached_scalars))
    assert torch.equal(replay(start, mask, path, lr=1e-2, noise=source), cached)


def test_noise_cache_setting(tiny):
    dense = build_mask(tiny.model, "dense", 1.0, fingerprint=tiny.fingerprint, scope="all")
    sparse = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=3)
    assert [wants_noise_cache("auto", m) for m in (dense, sparse)] == [False, True]
    assert wants_noise_cache("on", dense) and not wants_noise_cache("off", sparse)
