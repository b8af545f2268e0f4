"""Hugging Face `datasets` as a data source: save_to_disk folders, JSON arrays, hub ids. Never the network."""

from __future__ import annotations

import json
import sys
import types

import pytest

from meerkat_fl import config
from meerkat_fl.build import build_task_data
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.tasks import get_task

datasets = pytest.importorskip("datasets")

ROWS = {"sentence": ["a gorgeous, witty film", "dull and far too long", "a small delight"], "label": [1, 0, 1]}


def test_a_saved_dataset_folder_loads_by_path(tmp_path):
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "saved"))
    data = get_task("sst2").load("train", path=tmp_path / "saved")
    assert data.labels.tolist() == [1, 0, 1]
    assert data.prompts[1] == "dull and far too long It was"


def test_a_saved_dataset_dict_gives_the_asked_split_and_validation_for_test(tmp_path):
    train = datasets.Dataset.from_dict(ROWS)
    validation = datasets.Dataset.from_dict({"sentence": ["bad"], "label": ["negative"]})
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / "dict"))
    task = get_task("sst2")
    assert len(task.load("train", path=tmp_path / "dict")) == 3
    test = task.load("test", path=tmp_path / "dict")
    assert test.labels.tolist() == [0] and test.source.endswith(":validation")
    with pytest.raises(DataError, match="no split 'unlabeled'"):
        task.load("unlabeled", path=tmp_path / "dict")


def test_a_saved_folder_with_a_wrong_column_names_it(tmp_path):
    datasets.Dataset.from_dict({"text": ["x"], "label": [0]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"row 0: missing column\(s\) \['sentence'\]"):
        get_task("sst2").load("train", path=tmp_path / "saved")


def test_a_json_array_file_loads_as_datasets_json_loader_reads_it(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"sentence": s, "label": y} for s, y in zip(ROWS["sentence"], ROWS["label"])]))
    assert get_task("sst2").load("train", path=path).labels.tolist() == [1, 0, 1]
    path.write_text(json.dumps([{"sentence": "fine", "label": 0}, {"sentence": "", "label": 1}]))
    with pytest.raises(DataError, match=r"record 2, column 'sentence': empty text"):
        get_task("sst2").load("train", path=path)


def test_config_paths_reach_a_saved_folder_and_a_json_file(tmp_path, tiny):
    datasets.Dataset.from_dict(ROWS).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "test.jsonl").write_text('{"sentence": "awful", "label": "negative"}\n')
    cfg = config.load(None, [f"task.train_path={str(tmp_path / 'saved')!r}",
                             f"task.test_path={str(tmp_path / 'test.jsonl')!r}", "task.name=sst2"])
    data = build_task_data(cfg.task, tiny, seed=0)
    assert data.train_labels.tolist() == [1, 0, 1] and data.test.labels.tolist() == [0]


def test_hub_key_replaces_the_tasks_hub_dataset(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"sentence": "a treat", "label": 1}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = get_task("sst2").load("train", data_dir=tmp_path, hub="stanfordnlp/sst2")
    assert calls == [("stanfordnlp/sst2", None, "train")] and data.labels.tolist() == [1]
    get_task("sst2").load("test", hub="someone/sst2-copy:default")
    assert calls[-1] == ("someone/sst2-copy", "default", "validation")


def test_a_hub_id_names_the_task_that_reads_it():
    assert get_task("fancyzhx/dbpedia_14").name == "dbpedia"
    assert get_task("nyu-mll/glue:rte").name == "rte"
    with pytest.raises(ConfigError, match="several tasks"):
        get_task("nyu-mll/glue")
    with pytest.raises(ConfigError, match="task.hub=someone/unknown"):
        get_task("someone/unknown")
    with pytest.raises(ConfigError, match="not a Hugging Face dataset id"):
        get_task("a/b/c")


def test_offline_the_error_names_the_three_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        get_task("yelp_polarity").load("train", data_dir=tmp_path)
    message = str(caught.value)
    assert "(1) path=" in message and "save_to_disk" in message and "(2) data_dir=" in message
    assert "(3) network access to the Hugging Face dataset 'fancyzhx/yelp_polarity'" in message
    assert "Tried:" in message and "fancyzhx/yelp_polarity" in message.split("Tried:")[1]
