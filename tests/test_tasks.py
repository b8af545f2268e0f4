"""Tests for meerkat_fl.tasks: encoding, loaders, registry, the synthetic task, real data (scoring: test_scoring)."""

from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks import (
    ClassificationData,
    Task,
    encode,
    get_task,
    holdout_indices,
    label_token_ids,
    list_tasks,
    load_file,
)
from meerkat_fl.tasks.protocol import TaskProtocol
from meerkat_fl.tasks.synthetic import SENTIMENT

# The real datasets, found as conftest's data_dir fixture finds them.
DATA_DIR = Path(os.environ.get("MEERKAT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
WORDS = (" terrible", " great")
def test_batch_is_right_padded_with_last_index_at_last_real_token(tokenizer, data):
    encoded = encode(tokenizer, data, WORDS)
    batch = encoded.batch([1, 2])
    lengths = [len(encoded.token_ids[1]), len(encoded.token_ids[2])]
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.shape == (2, max(lengths))
    assert batch.last_index.tolist() == [n - 1 for n in lengths]
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    assert (batch.input_ids[0, lengths[0] :] == encoded.pad_id).all()


def test_encode_truncates_from_the_left_keeping_the_cue(tokenizer):
    prompt = "word " * 300 + "The end. It was"
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded = encode(tokenizer, ClassificationData([prompt], np.array([0]), "inline"), WORDS, max_length=16)
    assert encoded.token_ids[0] == full[-16:]


def test_encode_keeps_bos_when_truncating(tokenizer):
    class WithBos:  # the SmolLM2 tokenizer adds no BOS; wrap it in one that does
        pad_token_id, eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id

        def __call__(self, text, add_special_tokens=True):
            texts = [text] if isinstance(text, str) else text
            ids = [
                ([1] if add_special_tokens else []) + tokenizer.encode(t, add_special_tokens=False)
                for t in texts
            ]
            return {"input_ids": ids[0] if isinstance(text, str) else ids}

    prompt = "word " * 50 + "It was"
    full = tokenizer.encode(prompt, add_special_tokens=False)
    encoded = encode(WithBos(), ClassificationData([prompt], np.array([0]), "inline"), WORDS, max_length=8)
    assert encoded.token_ids[0] == [1] + full[-7:]


CLASSIFICATION = [name for name in list_tasks() if isinstance(get_task(name), Task)]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_label_words_are_single_distinct_tokens(tokenizer, name):
    task = get_task(name)
    assert len(set(label_token_ids(tokenizer, task.label_words))) == task.num_labels


def test_multi_token_label_word_is_rejected_by_name(tokenizer, data):
    with pytest.raises(ConfigError, match="Abbreviation"):
        encode(tokenizer, data, (" Abbreviation", " Number"))


# split -> (rows, rows per label) as in shared/data/SOURCES.md; holdout splits are checked below.
OFFICIAL = {
    ("sst2", "train"): (67349, [29780, 37569]),
    ("sst2", "test"): (872, [428, 444]),
    ("ag_news", "train"): (10001, [2509, 2458, 2496, 2538]),
    ("ag_news", "test"): (7600, [1900] * 4),
    ("rte", "train"): (2490, [1249, 1241]),
    ("rte", "test"): (277, [146, 131]),
    ("sst5", "train"): (8544, None),
    ("sst5", "validation"): (1101, None),
    ("sst5", "test"): (2210, None),
    ("trec", "train"): (5452, [1162, 1250, 86, 1223, 835, 896]),
    ("trec", "test"): (500, None),
}
# whole file -> rows per label (label order of the task); split 70/30 into train/test
HOLDOUT = {
    "boolq": [1237, 2033],
    "wic": [319, 319],
    "wsc": [66, 38],
    "cb": [23, 28, 5],
    "mr": [5331, 5331],
    "cr": [1366, 2405],  # 3,775 rows less 4 with empty text
    "subj": [5000, 5000],
}
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"needs ../shared/data (all tasks): {DATA_DIR} not present")


@needs_data
@pytest.mark.parametrize(("name", "split"), sorted(OFFICIAL))
def test_task_split_loads_real_rows(name, split):
    task = get_task(name)
    loaded = task.load(split, data_dir=DATA_DIR)
    rows, counts = OFFICIAL[(name, split)]
    assert len(loaded) == rows and loaded.labels.dtype == np.int64
    assert set(np.unique(loaded.labels)) == set(range(task.num_labels))
    if counts is not None:
        assert np.bincount(loaded.labels).tolist() == counts
    assert all(p and not p[-1].isspace() for p in loaded.prompts)


@needs_data
@pytest.mark.parametrize("name", sorted(HOLDOUT))
def test_holdout_task_splits_its_file_70_30_by_label(name):
    task = get_task(name)
    train, test = task.load("train", data_dir=DATA_DIR), task.load("test", data_dir=DATA_DIR)
    counts = np.bincount(train.labels, minlength=task.num_labels) + np.bincount(
        test.labels, minlength=task.num_labels
    )
    assert counts.tolist() == HOLDOUT[name]
    assert len(test) / (len(train) + len(test)) == pytest.approx(0.3, abs=0.02)


def test_holdout_indices_are_deterministic_disjoint_and_complete():
    labels = np.array([0, 1] * 50 + [2] * 7)
    train = holdout_indices(labels, "train", 0.3, seed=0)
    test = holdout_indices(labels, "test", 0.3, seed=0)
    assert np.array_equal(test, holdout_indices(labels, "test", 0.3, seed=0))
    assert sorted([*train, *test]) == list(range(len(labels)))
    assert np.bincount(labels[test]).tolist() == [15, 15, 2]
    assert not np.array_equal(test, holdout_indices(labels, "test", 0.3, seed=1))


def test_explicit_path_accepts_label_indices_names_and_words(tmp_path):
    path = tmp_path / "mine.jsonl.gz"
    rows = [
        {"sentence": "fine film", "label": 1},
        {"sentence": "dull", "label": "negative"},
        {"sentence": "wow", "label": " great"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps(row) for row in rows))
    loaded = get_task("sst2").load("train", path=path)
    assert loaded.prompts == ["fine film It was", "dull It was", "wow It was"]
    assert loaded.labels.tolist() == [1, 0, 1] and loaded.source == str(path)


def test_load_file_reads_csv_with_header(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text('a,b,label\n"x, y",z,0\nu,v,2\n', encoding="utf-8")
    loaded = load_file(path, ["a", "b"])
    assert loaded.prompts == ["x, y\nz", "u\nv"] and loaded.labels.tolist() == [0, 2]


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [
        ("missing_column.csv", "text,label\nhello,1\n", "'sentence'"),
        ("short_row.tsv", "sentence\tlabel\ngood\t1\nbad\n", "line 3"),
        ("bad_label.csv", "sentence,label\ngood,1\nbad,maybe\n", "line 3, column 'label'"),
        ("broken.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "oops", \n', "line 2"),
        ("empty.csv", "", "no data rows"),
        ("notes.txt", "sentence,label\n", "unknown file type"),
    ],
)
def test_malformed_file_gives_data_error_naming_file(tmp_path, name, content, where):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        get_task("sst2").load("train", path=path)
    assert str(path) in str(caught.value) and where in str(caught.value)


def test_unknown_task_lists_known_names():
    with pytest.raises(ConfigError) as caught:
        get_task("sst3")
    assert "sst3" in str(caught.value) and all(name in str(caught.value) for name in list_tasks())


def test_unknown_split_lists_known_splits():
    with pytest.raises(ConfigError, match="'train', 'test'"):
        get_task("rte").load("dev32", data_dir=DATA_DIR)


def test_no_source_names_all_three_options(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: as without the package
    with pytest.raises(DataError) as caught:
        get_task("yelp_polarity").load("train", data_dir=tmp_path)
    message = str(caught.value)
    assert "path=" in message and "data_dir=" in message and "MEERKAT_DATA_DIR" in message
    assert "fancyzhx/yelp_polarity" in message


def test_missing_local_file_falls_through_to_the_hub(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"text": "What does NASA stand for ?", "coarse_label": 0}]  # hub id 0 = ABBR

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    loaded = get_task("trec").load("test", data_dir=tmp_path)
    assert calls == [("CogComp/trec", None, "test")]
    assert loaded.labels.tolist() == [2] and loaded.prompts == ["What does NASA stand for ?\nAnswer type:"]


def test_subset_keeps_rows_in_given_order(tokenizer, data):
    picked = data.subset([3, 0])
    assert picked.prompts == [data.prompts[3], data.prompts[0]] and picked.labels.tolist() == [1, 1]
    encoded = encode(tokenizer, data, WORDS)
    assert encoded.subset([3, 0]).token_ids == [encoded.token_ids[3], encoded.token_ids[0]]


@pytest.mark.parametrize("name", list_tasks())
def test_every_registered_task_implements_the_protocol(name):
    assert isinstance(get_task(name), TaskProtocol)


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_tasks_report_accuracy_and_partition_by_class(name):
    task = get_task(name)
    assert task.primary_metric == "accuracy" and len(task.partition_names) == task.num_labels


def test_synthetic_task_is_generated_the_same_every_time_with_a_label_signal():
    task = get_task("synthetic")
    train, again, test = task.load("train"), task.load("train"), task.load("test")
    assert train.prompts == again.prompts and np.array_equal(train.labels, again.labels)
    assert (len(train), len(test)) == (2000, 500) and np.bincount(train.partition_labels).tolist() == [1000, 1000]
    assert not set(train.prompts) & set(test.prompts[:50])
    for prompt, label in zip(train.prompts[:200], train.labels[:200]):
        words = prompt.lower().removesuffix(" it was").replace(".", "").split()
        own, other = (sum(w in SENTIMENT[c] for w in words) for c in (label, 1 - label))
        assert own >= 2 > other and prompt.endswith(". It was")
    with pytest.raises(ConfigError, match="no split 'validation'"):
        task.load("validation")
