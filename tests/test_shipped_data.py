"""The data shipped inside the package: found with no data folder, recorded, rebuilt, inside the wheel."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from meerkat_fl import config
from meerkat_fl.data import BUNDLED_CALIBRATION, BUNDLED_DATA_DIR
from meerkat_fl.demo import DEMO_CONFIG, run_demo
from meerkat_fl.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["dbpedia/train.csv", "dbpedia/test.csv", "calibration/wikitext-2/test_head.txt", "README.md"]


def test_demo_task_loads_the_shipped_subset_without_a_data_dir():
    task = get_task("dbpedia")
    train, test = task.load("train"), task.load("test")
    assert Path(train.source) == BUNDLED_DATA_DIR / "dbpedia" / "train.csv"
    assert np.bincount(train.labels).tolist() == [200] * 14
    assert np.bincount(test.labels).tolist() == [50] * 14
    assert not set(train.prompts) & set(test.prompts)


def test_a_users_data_dir_wins_over_the_shipped_subset(tmp_path):
    (tmp_path / "dbpedia").mkdir()
    (tmp_path / "dbpedia" / "train.csv").write_text("label,text\nFilm,A 1999 film .\n0,Acme is a company .\n")
    data = get_task("dbpedia").load("train", data_dir=tmp_path)
    assert data.labels.tolist() == [12, 0] and Path(data.source).parent.parent == tmp_path


def test_calibration_falls_back_to_the_shipped_wikitext(tmp_path):
    cfg = config.resolve_environment(config.Config(), {"MEERKAT_DATA_DIR": str(tmp_path)})
    assert cfg.mask.calibration == str(BUNDLED_CALIBRATION)
    assert config.resolve_environment(config.Config(), {}).mask.calibration == str(BUNDLED_CALIBRATION)


def test_readme_records_every_shipped_files_sha256():
    readme = (BUNDLED_DATA_DIR / "README.md").read_text()
    for name in SHIPPED[:-1]:
        digest = hashlib.sha256((BUNDLED_DATA_DIR / name).read_bytes()).hexdigest()
        assert re.search(rf"`{re.escape(name)}` \| `{digest}`", readme), name


def test_recipe_rebuilds_the_shipped_dbpedia_subset_byte_for_byte(data_dir):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import build_demo_data
    finally:
        sys.path.pop(0)
    train, test = build_demo_data.dbpedia_subset(Path(data_dir) / "dbpedia" / "train_subset_14k.csv.gz")
    assert build_demo_data.csv_bytes(train) == (BUNDLED_DATA_DIR / "dbpedia" / "train.csv").read_bytes()
    assert build_demo_data.csv_bytes(test) == (BUNDLED_DATA_DIR / "dbpedia" / "test.csv").read_bytes()
    with gzip.open(Path(data_dir) / "dbpedia" / "train_subset_14k.csv.gz", "rt") as handle:
        assert sum(1 for _ in csv.reader(handle)) == 14_000


def test_the_wheel_carries_the_shipped_data(tmp_path):
    pytest.importorskip("setuptools")  # built offline with the venv's own setuptools (no build isolation)
    source = tmp_path / "src-copy"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("meerkat_fl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"meerkat_fl/data/{name}" in names
    assert "meerkat_fl/configs/demo.toml" in names


def test_demo_config_runs_a_short_round_on_the_shipped_data_alone(tmp_path, monkeypatch):
    """The demo's own config, with no data folder: the tiny model stands in for SmolLM2, one round each."""
    monkeypatch.delenv("MEERKAT_DATA_DIR", raising=False)
    assert config.load(DEMO_CONFIG).task.name == "dbpedia"
    small = ["model.source=tiny", "fed.rounds=1", "fed.num_clients=4", "fed.sample_count=2", "task.train_size=140",
             "task.eval_size=28", "mask.calibration_sequences=2", "mask.calibration_seq_len=32"]
    result = run_demo(tmp_path / "demo", small, progress=False)
    for name in ("meerkat", "full_fedzo"):
        run = tmp_path / "demo" / name
        summary = json.loads((run / "summary.json").read_text())
        assert summary["task"] == "dbpedia" and summary["rounds"] == 1
        assert 0.0 <= summary["final/accuracy"] <= 1.0 and summary["bytes_total"] > 0
        assert summary["environment"]["versions"]["torch"]
        assert config.load(run / "config.toml").task.data_dir is None
    # Full-FedZO shares Meerkat's zero-shot evaluation (same model and rows) and its file says so
    shared = json.loads((tmp_path / "demo" / "full_fedzo" / "zero_shot.json").read_text())
    own = json.loads((tmp_path / "demo" / "meerkat" / "zero_shot.json").read_text())
    assert shared.pop("copied_from") == str(tmp_path / "demo" / "meerkat") and shared == own
    assert result["summaries"]["full_fedzo"]["zero_shot/accuracy"] == own["zero_shot/accuracy"]
    assert result["summaries"]["meerkat"]["mask_kind"] == "sensitive"
    assert result["summaries"]["full_fedzo"]["mask_kind"] == "dense"
    assert Path(result["plot"]).is_file()
