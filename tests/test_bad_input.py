"""Every bad input is one line on stderr and a non-zero exit, never a traceback (issue 15, item 5).

One test per family, each running the real `meerkat` entry point (``cli.main``) in-process: an exception
escaping it is the traceback a user would see, so it fails the test. Config-level cases fail before any model
is loaded; the run-folder cases share one tiny 1-round run.
"""

from __future__ import annotations

import gzip
import os
import shutil
import typing
from pathlib import Path

import pytest

from meerkat_fl import cli, config
from meerkat_fl.config_checks import FRACTIONS, LIMITS, NON_NEGATIVE, POSITIVE, POSITIVE_OR_NONE

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes anywhere: no unwritable folder to test


def fails(argv: list[str], capsys, *fragments: str) -> str:
    """Run the CLI; assert a non-zero exit and exactly one stderr line naming every fragment; return it."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"{argv} exited 0"
    assert "Traceback" not in err
    assert len(lines) == 1, f"{argv}: expected one line on stderr, got {lines}"
    for fragment in fragments:
        assert fragment in lines[0], f"{argv}: {fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture()
def files(tmp_path, monkeypatch):
    """A folder of hostile paths: a folder, a binary file, a text file, and what lies under a file."""
    monkeypatch.chdir(tmp_path)
    Path("folder").mkdir()
    Path("binary").write_bytes(b"\x00\x01\xff\xfe" * 8)
    Path("text").write_text("not toml\n")
    return tmp_path


@pytest.mark.parametrize("argv, fragments", [
    (["run", "folder"], ["folder", "is a folder"]),
    (["run", "binary"], ["binary", "not UTF-8"]),
    (["run", "text"], ["text", "not valid TOML"]),
    (["run", "missing.toml"], ["missing.toml", "does not exist"]),
    (["run", "--resume", "binary"], ["--resume binary", "not a run folder"]),
    (["run", "--resume", "missing"], ["missing", "not a run folder"]),
    (["run", "--resume", "folder"], ["folder", "no config.toml"]),
    (["finetune", "--resume", "text"], ["text", "not a run folder"]),
    (["tune", "--resume", "binary"], ["binary", "not a sweep folder"]),
    (["tune", "folder"], ["folder", "is a folder"]),
    (["eval", "--config", TINY, "--patch", "folder"], ["folder", "a folder, not a file"]),
    (["eval", "--config", TINY, "--patch", "binary"], ["binary", "safetensors"]),
    (["run", TINY, "--set", "mask.path=folder", "--out", "r1"], ["folder", "a folder, not a file"]),
    (["run", TINY, "--set", "model.source=missing/model", "--out", "r2"], ["missing/model"]),
    (["plot", "missing", "--out", "p.png"], ["missing", "not a run folder"]),
    (["gradip", "text"], ["text", "gradip.jsonl"]),
])
def test_a_bad_input_path_is_one_line(files, capsys, argv, fragments):
    fails(argv, capsys, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["mask", "--model", "tiny", "--kind", "random", "--out", "folder"], ["--out folder", "is a folder"]),
    (["mask", "--model", "tiny", "--kind", "random", "--out", "text/m.safetensors"], ["text", "is a file"]),
    (["partition", "--task", "synthetic", "--clients", "4", "--out", "folder"], ["--out folder", "is a folder"]),
    (["plot", "folder", "--out", "text/p.png"], ["text/p.png", "is a file"]),
    (["run", TINY, "--out", "text"], ["text", "is a file"]),
    (["run", TINY, "--out", "text/run"], ["text/run", "Not a directory"]),
    (["finetune", "--config", TINY, "--out", "binary"], ["binary", "is a file"]),
    (["tune", TINY, "--out", "text"], ["--out text", "is a file"]),
    (["export", "--model", "tiny", "--patch", "binary", "--out", "text"], ["--out text", "is a file"]),
    (["flower", "certs", "text"], ["text", "is a file"]),
    (["flower", "worker", "--socket", "text"], ["text", "not a socket"]),  # and text is still there (below)
    (["flower", "worker", "--socket", "nodir/sock"], ["nodir/sock", "No such file"]),  # main's OSError net
    pytest.param(["mask", "--model", "tiny", "--kind", "random", "--out", "locked/m.safetensors"],
                 ["locked", "not writable"], marks=pytest.mark.skipif(ROOT, reason="root can write anywhere")),
])
def test_a_bad_output_path_is_refused_before_any_work(files, capsys, argv, fragments):
    locked = Path("locked")
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(argv, capsys, *fragments)
    finally:
        locked.chmod(0o700)
    assert not any(files.glob("**/*.tmp")), "a refused write left a temporary file behind"
    assert Path("text").read_text() == "not toml\n" and Path("binary").stat().st_size == 32


def _numeric_keys() -> dict[str, typing.Any]:
    hints = {}
    for section in config._sections():
        for name, hint in typing.get_type_hints(type(getattr(config.Config(), section))).items():
            kinds = set(typing.get_args(hint)) or {hint}
            if kinds & {int, float} and typing.get_origin(hint) is not tuple:  # vp's windows: _validate_vp
                hints[f"{section}.{name}"] = hint
    return hints


def test_every_numeric_key_has_a_range_rule():
    """A new numeric setting must join a rule table (config_checks), so no value of it goes unchecked."""
    ruled = POSITIVE | NON_NEGATIVE | POSITIVE_OR_NONE | FRACTIONS
    assert sorted(set(_numeric_keys()) - ruled) == []


def _meaningless_values() -> list[tuple[str, str, str]]:
    """(key, value, what the message says) for every ruled key: non-finite floats, values below its range."""
    cases = []
    for key, hint in sorted(_numeric_keys().items()):
        if float in (set(typing.get_args(hint)) or {hint}):
            cases += [(key, "nan", "finite"), (key, "inf", "finite"), (key, "-inf", "finite")]
        if key in POSITIVE or key in FRACTIONS:
            cases += [(key, "0", key), (key, "-1", key)]
        elif key in POSITIVE_OR_NONE:
            cases += [(key, "0", ">= 1")]
        else:
            cases += [(key, "-1", ">= 0")]
    return cases


@pytest.mark.parametrize("key, value, says", [
    *_meaningless_values(),
    ("run.seed", "-1", ">= 0"), ("zo.lr", "nan", "finite"), ("zo.eps", "inf", "finite"),  # the cases
    ("fedmezo.lr_scale", "nan", "finite"), ("zo.lr", "1e400", "finite"), ("run.seed", "1.5", "expected int"),
    ("model.device", "banana", "cpu, cuda"),
])
def test_a_meaningless_number_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, key, value, says):
    monkeypatch.chdir(tmp_path)
    fails(["run", TINY, "--set", f"{key}={value}", "--out", "never"], capsys, key, says)
    assert not Path("never").exists()


@pytest.mark.parametrize("key, limit", sorted(LIMITS.items()))
def test_memory_driving_keys_have_a_stated_upper_bound(tmp_path, monkeypatch, capsys, key, limit):
    monkeypatch.chdir(tmp_path)
    fails(["run", TINY, "--set", f"{key}={limit + 1}", "--out", "never"], capsys,
          f"{key} = {limit + 1} exceeds the limit {limit}")
    config.load(TINY, [f"{key}={limit}"])  # the limit itself is allowed


@pytest.mark.parametrize("argv, fragments", [
    (["flower", "deploy", TINY, "--nodes", "0"], ["--nodes", "must be in [1, "]),
    (["flower", "sim", TINY, "--round-timeout", "nan"], ["--round-timeout", "nan"]),
    (["flower", "sim", TINY, "--round-timeout", "inf"], ["--round-timeout", "inf"]),
    (["flower", "sim", TINY, "--stop-after", "0"], ["--stop-after", "0"]),
    (["flower", "certs", "keys", "--nodes", "-2"], ["--nodes", "-2"]),
    (["partition", "--task", "synthetic", "--clients", "many"], ["--clients", "'many'"]),
    (["run", TINY, "--set", "zo.batch_size"], ["zo.batch_size", "key=value"]),
])
def test_a_bad_command_line_flag_is_one_line(capsys, argv, fragments):
    fails(argv, capsys, *fragments)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny 1-round run written through the CLI (so its config is resolved as a user's would be)."""
    out = tmp_path_factory.mktemp("runs") / "good"
    assert cli.main(["run", TINY, "--set", "fed.rounds=1", "--out", str(out), "--quiet"]) == 0
    return out


def test_export_refuses_an_existing_path_unless_overwrite(finished_run, files, capsys):
    patch = str(finished_run / "patch.safetensors")
    fails(["export", "--model", "tiny", "--patch", patch, "--out", str(finished_run)], capsys,
          str(finished_run), "--overwrite")
    fails(["export", "--model", "tiny", "--patch", patch, "--out", "text"], capsys, "text", "is a file")
    assert Path("text").read_text() == "not toml\n"
    Path("folder", "notes.txt").write_text("mine\n")
    assert cli.main(["export", "--model", "tiny", "--patch", patch, "--out", "folder", "--overwrite"]) == 0
    assert Path("folder", "config.json").is_file() and Path("folder", "notes.txt").read_text() == "mine\n"


GARBAGE = b"\xff\xfe\x00\x9c" * 40


@pytest.mark.parametrize("name, content, command, fragment", [
    ("metrics.jsonl", GARBAGE, "plot", "metrics.jsonl"),
    ("metrics.jsonl", GARBAGE, "resume", "metrics.jsonl"),
    ("metrics.jsonl", b'{"round": "one", "eval/accuracy": 0.5}\n{"round": 2}\n', "resume", "metrics.jsonl:1"),
    ("metrics.jsonl", b'{"round": 1, "eval/accuracy": "high"}\n', "plot", "eval/accuracy"),
    ("summary.json", GARBAGE, "plot", "summary.json"),
    ("summary.json", b"[1, 2]", "plot", "summary.json"),
    ("summary.json", b'{"primary_metric": 5}', "plot", "primary_metric"),
    ("zero_shot.json", b"[0.5]", "resume", "zero_shot.json"),
    ("config.toml", GARBAGE, "resume", "config.toml"),
    ("config.toml", None, "resume", "config.toml"),  # None: a folder where the file should be
    ("checkpoint.safetensors", GARBAGE, "resume", "checkpoint"),
    ("gradip.jsonl", b'{"round": 1, "gradip": [0.1]}\n', "gradip", "gradip.jsonl"),
    ("grid.json", b"{not json", "tune", "grid.json"),
    ("grid.json", b'{"zo.lr": 0.1}', "tune", "grid.json"),
])
def test_a_damaged_file_in_a_run_folder_is_one_line_naming_it(finished_run, tmp_path, capsys, name, content, command,
                                                              fragment):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    if command == "tune":  # a sweep folder: base.toml beside the damaged grid
        shutil.copy(TINY, run / "base.toml")
    target = run / name
    target.unlink(missing_ok=True)
    if content is None:
        target.mkdir()
    else:
        target.write_bytes(content)
    argv = {"plot": ["plot", str(run), "--out", str(tmp_path / "p.png")], "gradip": ["gradip", str(run)],
            "resume": ["run", "--resume", str(run), "--quiet"], "tune": ["tune", "--resume", str(run), "--quiet"]}
    fails(argv[command], capsys, fragment)


def _fake_sst2(folder: Path) -> None:
    """A 48-row SST-2 laid out like shared/data (train.tsv.gz, dev.tsv)."""
    rows = [(i % 2, f"a {'fine' if i % 2 else 'dull'} film number {i}") for i in range(48)]
    (folder / "sst2").mkdir(parents=True)
    with gzip.open(folder / "sst2" / "train.tsv.gz", "wt") as handle:
        handle.write("label\tsentence\n" + "".join(f"{y}\t{t}\n" for y, t in rows))
    (folder / "sst2" / "dev.tsv").write_text("label\tcontent\n" + "".join(f"{y}\t{t}\n" for y, t in rows[:16]))


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_resume_resolves_data_like_run(tmp_path, monkeypatch, capsys, command):
    """A run folder whose config leaves task.data_dir unset (a run killed before its first checkpoint, or one
    started elsewhere) resumes with $MEERKAT_DATA_DIR, as `meerkat run CONFIG` would read it."""
    data = tmp_path / "data"
    _fake_sst2(data)
    run = tmp_path / "run"
    run.mkdir()
    text = Path(TINY).read_text().replace('name = "synthetic"\ntrain_size = 400\neval_size = 64',
                                          'name = "sst2"\ntrain_size = 40\neval_size = 16')
    assert 'name = "sst2"' in text
    (run / "config.toml").write_text(text + "\n[train]\nsteps = 2\neval_every = 0\n")
    monkeypatch.setenv("MEERKAT_DATA_DIR", str(data))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli.main([command, "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert (run / "summary.json").is_file()
