"""Tests for meerkat_fl.partition: determinism, coverage, skew, purity, JSON round trip, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from meerkat_fl.errors import DataError
from meerkat_fl.partition import (
    Partition,
    dirichlet,
    format_histogram,
    iid,
    label_histogram,
    load_partition,
    make_partition,
    mixture,
    pathological,
    save_partition,
)

NUM_CLASSES = 4


@pytest.fixture
def labels() -> np.ndarray:
    """2000 examples over 4 classes, shuffled, mildly unbalanced (500 ± 100)."""
    counts = [600, 500, 500, 400]
    values = np.repeat(np.arange(NUM_CLASSES), counts)
    return np.random.default_rng(123).permutation(values)


def dominant_share(labels: np.ndarray, partition: Partition) -> np.ndarray:
    counts = label_histogram(labels, partition)
    return counts.max(axis=1) / counts.sum(axis=1)


ALL_SCHEMES = [
    ("iid", {}),
    ("iid", {"sizes": [1.0, 2.0, 3.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}),
    ("dirichlet", {"alpha": 0.5}),
    ("pathological", {"labels_per_client": 2}),
    ("mixture", {"num_extreme": 3}),
    ("mixture", {"num_extreme": 3, "rest": "iid"}),
]


@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES)
def test_same_seed_gives_identical_arrays(labels, scheme, params):
    first = make_partition(labels, scheme, 10, seed=7, **params)
    second = make_partition(labels, scheme, 10, seed=7, **params)
    assert first == second
    assert all(np.array_equal(a, b) for a, b in zip(first.clients, second.clients))


@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES)
def test_different_seed_gives_different_arrays(labels, scheme, params):
    first = make_partition(labels, scheme, 10, seed=7, **params)
    second = make_partition(labels, scheme, 10, seed=8, **params)
    assert not all(np.array_equal(a, b) for a, b in zip(first.clients, second.clients))


@pytest.mark.parametrize(("scheme", "params"), ALL_SCHEMES)
def test_clients_are_disjoint_sorted_int64(labels, scheme, params):
    partition = make_partition(labels, scheme, 10, seed=0, **params)
    every = np.concatenate(partition.clients)
    assert np.unique(every).size == every.size
    assert every.max() < labels.size
    for indices in partition.clients:
        assert indices.dtype == np.int64
        assert np.all(np.diff(indices) > 0)
    assert len(partition.kinds) == len(partition.clients) == 10


@pytest.mark.parametrize(("scheme", "params"), [s for s in ALL_SCHEMES if s[0] in ("iid", "dirichlet")])
def test_iid_and_dirichlet_use_every_example_once(labels, scheme, params):
    partition = make_partition(labels, scheme, 10, seed=0, **params)
    assert np.array_equal(np.sort(np.concatenate(partition.clients)), np.arange(labels.size))
    assert partition.sizes().sum() == labels.size


def test_iid_label_shares_close_to_global(labels):
    partition = iid(labels, 10, seed=0)
    global_share = np.bincount(labels) / labels.size
    shares = label_histogram(labels, partition) / partition.sizes()[:, None]
    assert np.abs(shares - global_share).max() < 0.1
    assert set(partition.kinds) == {"iid"}
    assert partition.sizes().max() - partition.sizes().min() <= 1


def test_iid_sizes_are_respected(labels):
    weights = [1.0, 2.0, 3.0, 4.0]
    sizes = iid(labels, 4, seed=0, sizes=weights).sizes()
    expected = labels.size * np.array(weights) / sum(weights)
    assert np.abs(sizes - expected).max() <= 1


def test_small_alpha_is_more_skewed_than_large_alpha(labels):
    skewed = dominant_share(labels, dirichlet(labels, 10, alpha=0.1, seed=0)).mean()
    uniform = dominant_share(labels, dirichlet(labels, 10, alpha=100.0, seed=0)).mean()
    global_dominant = np.bincount(labels).max() / labels.size
    assert skewed > uniform + 0.3
    assert abs(uniform - global_dominant) < 0.05


def test_dirichlet_respects_min_size(labels):
    assert dirichlet(labels, 10, alpha=0.5, seed=3, min_size=0).sizes().min() < 100  # first draw too small
    partition = dirichlet(labels, 10, alpha=0.5, seed=3, min_size=100)
    assert partition.sizes().min() >= 100
    assert set(partition.kinds) == {"dirichlet"}


def test_pathological_single_label_clients_are_pure(labels):
    partition = pathological(labels, 8, labels_per_client=1, seed=0)
    counts = label_histogram(labels, partition)
    assert np.all((counts > 0).sum(axis=1) == 1)
    assert np.all(dominant_share(labels, partition) == 1.0)
    assert partition.kinds == ("extreme",) * 8


def test_pathological_two_labels_per_client(labels):
    partition = pathological(labels, 10, labels_per_client=2, seed=0)
    counts = label_histogram(labels, partition)
    assert np.all((counts > 0).sum(axis=1) == 2)
    assert partition.kinds == ("pathological",) * 10


def test_mixture_extreme_clients_are_pure_and_others_mixed(labels):
    partition = mixture(labels, 10, num_extreme=3, seed=0, alpha=1.0)
    assert partition.kinds == ("extreme",) * 3 + ("dirichlet",) * 7
    counts = label_histogram(labels, partition)
    assert np.all((counts[:3] > 0).sum(axis=1) == 1)
    assert np.all(dominant_share(labels, partition)[:3] == 1.0)
    assert np.all((counts[3:] > 0).sum(axis=1) >= 2)
    assert len({int(np.argmax(row)) for row in counts[:3]}) == 3  # round-robin: three different labels


def test_pathological_leaves_unheld_labels_out(labels):
    partition = pathological(labels, 2, labels_per_client=1, seed=0)
    held = (label_histogram(labels, partition) > 0).sum(axis=0)
    assert held.sum() == 2 and held.max() == 1
    assert partition.sizes().sum() < labels.size


def test_mixture_all_extreme_clients(labels):
    partition = mixture(labels, 6, num_extreme=6, seed=0)
    assert partition.kinds == ("extreme",) * 6
    assert np.all(dominant_share(labels, partition) == 1.0)


def test_mixture_with_iid_rest(labels):
    partition = mixture(labels, 6, num_extreme=2, seed=1, rest="iid")
    assert partition.kinds == ("extreme", "extreme", "iid", "iid", "iid", "iid")
    counts = label_histogram(labels, partition)
    assert np.all((counts[2:] > 0).sum(axis=1) == NUM_CLASSES)


def test_json_round_trip_is_exact(labels, tmp_path):
    partition = mixture(labels, 10, num_extreme=3, seed=5)
    assert Partition.from_json(json.loads(json.dumps(partition.to_json()))) == partition
    path = tmp_path / "partition.json"
    save_partition(partition, path)
    loaded = load_partition(path)
    assert loaded == partition
    assert loaded.params == partition.params
    assert all(
        np.array_equal(a, b) and b.dtype == np.int64 for a, b in zip(partition.clients, loaded.clients)
    )


def test_json_round_trip_keeps_iid_sizes(labels):
    partition = iid(labels, 3, seed=0, sizes=[1, 2, 3])
    assert Partition.from_json(json.loads(json.dumps(partition.to_json()))) == partition


@pytest.mark.parametrize(
    ("mutate", "cause"),
    [
        (lambda d: d.pop("clients"), "clients"),
        (lambda d: d.update(kinds=["iid"]), "kinds"),
        (lambda d: d["kinds"].__setitem__(0, "weird"), "unknown kind"),
        (lambda d: d["clients"][0].append(d["clients"][1][0]), "sorted|overlap"),
        (lambda d: d["clients"].__setitem__(0, ["x"]), "integers"),
        (lambda d: d.update(format="other"), "not a partition"),
    ],
)
def test_from_json_rejects_malformed(labels, mutate, cause):
    data = iid(labels, 3, seed=0).to_json()
    mutate(data)
    with pytest.raises(DataError, match=cause):
        Partition.from_json(data)


def test_load_partition_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_partition(path)


@pytest.mark.parametrize(
    ("call", "cause"),
    [
        (lambda y: iid(y, 0, seed=0), "num_clients"),
        (lambda y: iid(y, 2001, seed=0), "more clients"),
        (lambda y: dirichlet(y, 2001, alpha=1.0, seed=0), "more clients"),
        (lambda y: iid(np.array([], dtype=np.int64), 2, seed=0), "non-empty"),
        (lambda y: dirichlet(y, 4, alpha=0.0, seed=0), "alpha"),
        (lambda y: dirichlet(y, 4, alpha=-1.0, seed=0), "alpha"),
        (lambda y: dirichlet(y, 10, alpha=1.0, seed=0, min_size=300), "needs 3000 examples"),
        (lambda y: dirichlet(y[:60], 50, alpha=0.001, seed=0), "tries"),
        (lambda y: pathological(y, 4, labels_per_client=5, seed=0), "exceeds the 4 distinct labels"),
        (lambda y: pathological(y[:6], 8, labels_per_client=1, seed=0), "some client would be empty"),
        (lambda y: mixture(y, 4, num_extreme=5, seed=0), "num_extreme"),
        (lambda y: mixture(y, 4, num_extreme=1, seed=0, rest="shards"), "rest"),
        (lambda y: iid(y, 3, seed=0, sizes=[1.0, 0.0, 1.0]), "sizes"),
        (lambda y: iid(y, 3, seed=0, sizes=[1.0, 1e-9, 1.0]), "client 1 would be empty"),
    ],
)
def test_impossible_partitions_raise_data_error_naming_cause(labels, call, cause):
    with pytest.raises(DataError, match=cause):
        call(labels)


def test_make_partition_unknown_scheme_lists_names(labels):
    with pytest.raises(
        DataError, match=r"unknown partition scheme 'shards'.*dirichlet.*iid.*mixture.*pathological"
    ):
        make_partition(labels, "shards", 4, seed=0)


def test_make_partition_rejects_unknown_and_missing_params(labels):
    with pytest.raises(DataError, match="unknown params \\['beta'\\]"):
        make_partition(labels, "dirichlet", 4, seed=0, alpha=1.0, beta=2.0)
    with pytest.raises(DataError, match="missing params \\['alpha'\\]"):
        make_partition(labels, "dirichlet", 4, seed=0)


def test_make_partition_equals_direct_call(labels):
    assert make_partition(labels, "dirichlet", 5, seed=2, alpha=0.3) == dirichlet(
        labels, 5, alpha=0.3, seed=2
    )


def test_label_histogram_counts_match(labels):
    partition = dirichlet(labels, 5, alpha=0.5, seed=0)
    counts = label_histogram(labels, partition)
    assert counts.shape == (5, NUM_CLASSES)
    assert np.array_equal(counts.sum(axis=0), np.bincount(labels))
    assert np.array_equal(counts.sum(axis=1), partition.sizes())


def test_format_histogram_has_a_row_per_client(labels):
    partition = mixture(labels, 6, num_extreme=2, seed=0)
    text = format_histogram(labels, partition, label_names=["neg", "neu", "pos", "other"])
    lines = text.splitlines()
    for name in ("client", "kind", "size", "neg", "other", "dominant"):
        assert name in lines[1]
    for client, kind in enumerate(partition.kinds):
        row = next(line for line in lines if line.split()[0] == str(client))
        assert kind in row and str(partition.sizes()[client]) in row
    assert "100.0%" in text


def test_format_histogram_rejects_wrong_label_names(labels):
    with pytest.raises(DataError, match="label_names"):
        format_histogram(labels, iid(labels, 2, seed=0), label_names=["a", "b"])


def test_no_global_rng_use(labels):
    np.random.seed(0)
    before = np.random.random()
    np.random.seed(0)
    dirichlet(labels, 5, alpha=0.5, seed=0)
    mixture(labels, 5, num_extreme=2, seed=0)
    assert np.random.random() == before
