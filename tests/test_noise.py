"""Noise sources: Philox's bits against a NumPy reference, the distributions, versioned noise checks."""

import math

import numpy as np
import pytest
import torch

from meerkat_fl import config, noise, noise_reference, philox
from meerkat_fl.errors import ConfigError, MessageRejected
from meerkat_fl.fed.client import Client, ClientRuntime
from meerkat_fl.fed.messages import RoundPlan, decode_plan, encode_plan
from meerkat_fl.local import DataPointer, local_train
from meerkat_fl.masks import build_mask
from meerkat_fl.noise import LEGACY, NoiseSource, check_noise, segment_seed
from meerkat_fl.zo import MaskedParams

PHILOX = NoiseSource("philox", "gaussian")
RADEMACHER = NoiseSource("philox", "rademacher")
KINDS = ("gaussian", "rademacher")


def bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.int32)


def test_philox_matches_random123s_known_answer():
    # Random123 kat_vectors, philox4x32 R=10, counter (0, 0, 0, 0) and key (0, 0)
    expected = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    zero = torch.zeros(1, dtype=torch.int64)
    assert philox.philox4x32(zero, zero, 0, 0)[0].tolist() == expected
    assert noise_reference.philox4x32_10(np.zeros(1, np.uint64), 0, 0)[0].tolist() == expected


@pytest.mark.parametrize("key", [0, 1, 12345, segment_seed(7, 3), (1 << 63) - 1])
def test_philox_words_equal_the_reference_for_any_key_and_counter(key):
    counters = np.random.default_rng(key % 1000).integers(0, 2**62, 5000, dtype=np.int64)
    counters[:3] = [0, 1, 2**32 - 1]  # the carry into the counter's high word
    ours = philox.philox4x32(torch.from_numpy(counters) & philox.MASK32, torch.from_numpy(counters) >> 32,
                             key & philox.MASK32, key >> 32)
    ref = noise_reference.philox4x32_10(counters.astype(np.uint64), key & 0xFFFFFFFF, key >> 32)
    assert np.array_equal(ours.numpy(), ref.astype(np.int64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,position,size", [(0, 0, 1), (1, 0, 3), (7, 2, 129), (2**62 + 5, 11, 300_001)])
def test_torch_cpu_bits_equal_the_numpy_reference(kind, seed, position, size):
    key = segment_seed(seed, position)
    ours = NoiseSource("philox", kind).segment(seed, position, size)
    assert np.array_equal(bits(ours), bits(noise_reference.segment(kind, key, size)))


@pytest.mark.parametrize("kind", KINDS)
def test_bits_do_not_depend_on_chunk_boundaries_or_counter_offsets(kind, monkeypatch):
    source, sizes = NoiseSource("philox", kind), [5, 0, 130, 1000, 3, 257, 100, 100]
    whole = [source.segment(9, i, n) for i, n in enumerate(sizes)]
    key = segment_seed(9, 3)
    for start, stop in [(0, 1000), (1, 2), (127, 129), (500, 1000), (3, 997)]:  # arbitrary counter windows
        assert torch.equal(philox.segment_values(kind, key, start, stop), whole[3][start:stop])
    monkeypatch.setattr(noise, "CHUNK", 256)  # a chunk much smaller than one segment, and batches of several
    assert torch.equal(torch.cat([source.segment(9, i, n) for i, n in enumerate(sizes)]), torch.cat(whole))
    assert torch.equal(source.draw(9, sizes), torch.cat(whole))


@pytest.mark.parametrize("source", [LEGACY, PHILOX, RADEMACHER, NoiseSource("torch_cpu", "rademacher")],
                         ids=lambda s: s.name)
def test_a_whole_mask_draw_equals_its_segments(source):
    sizes = [5, 0, 130, 1000, 3, 257]
    assert torch.equal(source.draw(4, sizes), torch.cat([source.segment(4, i, n) for i, n in enumerate(sizes)]))


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.frompyfunc(math.erf, 1, 1)(x / math.sqrt(2.0)).astype(np.float64))


@pytest.mark.parametrize("source", [PHILOX, LEGACY], ids=lambda s: s.name)
def test_a_million_gaussian_draws_pass_moments_and_kolmogorov_smirnov(source):
    n = 1 << 20
    z = np.sort(source.segment(2024, 0, n).double().numpy())
    se = 1.0 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se and abs(z.var() - 1.0) < 5 * math.sqrt(2.0) * se
    assert abs((z**3).mean()) < 5 * math.sqrt(15.0) * se  # skewness 0 (third moment's sd is sqrt(15))
    assert abs((z**4).mean() - 3.0) < 5 * math.sqrt(96.0) * se  # kurtosis 3 (fourth moment's sd is sqrt(96))
    cdf = normal_cdf(z)
    ks = max(float((np.arange(1, n + 1) / n - cdf).max()), float((cdf - np.arange(n) / n).max()))
    assert ks < 1.95 / math.sqrt(n)  # the 0.1% critical value of the one-sample KS test
    assert np.abs(z).max() < 6.2  # q >= 2^-33: |z| <= 6.1


def test_rademacher_is_balanced_and_adjacent_signs_are_uncorrelated():
    n = 1 << 20
    z = RADEMACHER.segment(5, 0, n).double()
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    for lag in (1, 31, 32, 128):  # within a word, across words, across blocks
        assert abs(float((z[lag:] * z[:-lag]).mean())) < 5 / math.sqrt(n)


@pytest.mark.parametrize("source", [LEGACY, PHILOX, RADEMACHER], ids=lambda s: s.name)
def test_zo_steps_with_each_noise_lower_the_training_loss(tiny, source):
    mask = build_mask(tiny.model, "random", 0.05, fingerprint=tiny.fingerprint, seed=0)
    params = MaskedParams(tiny.model, mask, cache_noise=True, noise=source)
    start = params.gather()
    ids = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss(rows=None) -> float:
        with torch.no_grad():
            return float(tiny.model(input_ids=ids, labels=ids).loss)

    before = loss()
    values = start.clone()
    local_train(params, values, list(range(60)), lr=2e-2, eps=1e-3, batch_loss=loss,
                pointer=DataPointer(4, seed=0), batch_size=4)
    after = loss()
    params.write(start)
    assert after < before - 0.05, (before, after)


def test_names_are_versioned_and_a_mismatch_names_both():
    assert (LEGACY.name, PHILOX.name, RADEMACHER.name) == (
        "torch_cpu/gaussian/v1", "philox/gaussian/v1", "philox/rademacher/v1")
    check_noise(LEGACY.name, None, "an old checkpoint")  # recorded before versioned noise: the legacy source
    with pytest.raises(ConfigError, match="philox/gaussian/v1.*torch_cpu/gaussian/v1"):
        check_noise(LEGACY.name, PHILOX.name, "the checkpoint")
    with pytest.raises(ConfigError, match="zo.noise_generator"):
        NoiseSource("mt19937", "gaussian")
    with pytest.raises(ConfigError, match="zo.noise"):
        config.load(None, ["zo.noise=uniform"])


def test_the_plan_carries_the_noise_and_a_client_with_another_refuses_it(tiny):
    plan = RoundPlan(0, 0, np.array([1, 2], np.int64), 1e-3, 1e-3, 4, values=np.zeros(3, np.float32),
                     noise=PHILOX.name)
    assert decode_plan(encode_plan(plan)).noise == PHILOX.name
    mask = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint, seed=0)
    runtime = ClientRuntime(MaskedParams(tiny.model, mask, noise=LEGACY), None, None, torch.zeros(mask.size))
    with pytest.raises(MessageRejected, match="philox/gaussian/v1.*torch_cpu/gaussian/v1"):
        Client(0, np.arange(4), 0).sync(plan, runtime)
    data = encode_plan(plan)
    old, new = b'"noise":"philox/gaussian/v1"', b'"noise":[1]'
    head = int.from_bytes(data[5:9], "little") + len(new) - len(old)
    forged = data[:5] + head.to_bytes(4, "little") + data[9:].replace(old, new)
    with pytest.raises(MessageRejected, match="noise"):
        decode_plan(forged)


def test_a_run_records_its_noise_and_refuses_to_resume_with_another(tiny_cfg, tmp_path):
    from meerkat_fl.fed.simulate import simulate
    from meerkat_fl.patch import load_patch

    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=2", "zo.noise_generator=philox", "run.zero_shot=false"])
    out = tmp_path / "run"
    simulate(cfg, out, progress=False, stop_after=1)
    assert 'noise_generator = "philox"' in (out / "config.toml").read_text()
    other = config.apply_overrides(cfg, ["zo.noise_generator=torch_cpu"])
    with pytest.raises(ConfigError, match="zo.noise_generator"):  # the checkpoint's config names the change
        simulate(other, out, progress=False, resume=True)
    simulate(cfg, out, progress=False, resume=True)
    assert load_patch(out / "patch.safetensors").meta["noise"] == PHILOX.name
