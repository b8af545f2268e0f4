"""The run shell (meerkat_fl.run): a run folder never reports what did not happen, and resume refuses to
continue from a checkpoint it cannot trust."""

from __future__ import annotations

import json

import pytest

from meerkat_fl import cli, config
from meerkat_fl.errors import ConfigError, DataError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.finetune import finetune
from meerkat_fl.rundir import CHECKPOINT, RunDir


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line]


def test_resume_without_a_checkpoint_starts_clean(tiny_cfg, tmp_path, assert_same_run):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=3", "run.checkpoint_every=2"])
    simulate(cfg, tmp_path / "full", progress=False)
    simulate(cfg, tmp_path / "cut", progress=False, stop_after=1)
    (tmp_path / "cut" / CHECKPOINT).unlink()  # killed before its first checkpoint, or the checkpoint was lost
    summary = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert [r["round"] for r in rows(tmp_path / "cut")] == [1, 2, 3]  # not 1, 1, 2, 3
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    assert summary["bytes_total"] == json.loads((tmp_path / "full" / "summary.json").read_text())["bytes_total"]


def test_a_new_run_refuses_a_folder_holding_a_run_unless_overwritten(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=1"])
    simulate(cfg, tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        simulate(cfg, tmp_path, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing lost
    simulate(cfg, tmp_path, progress=False, overwrite=True)
    assert [r["round"] for r in rows(tmp_path)] == [1]


def test_resuming_a_finished_run_reports_its_real_final_metrics(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=2", "zo.lr=0.5"])
    done = simulate(cfg, tmp_path, progress=False)
    again = simulate(cfg, tmp_path, progress=False, resume=True)
    assert again["final/accuracy"] == done["final/accuracy"] == rows(tmp_path)[-1]["eval/accuracy"]
    assert again["zero_shot/accuracy"] == done["zero_shot/accuracy"]
    assert again["bytes_total"] == done["bytes_total"]


def test_resume_refuses_a_changed_config_naming_the_keys_but_lets_rounds_grow(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=2"])
    simulate(cfg, tmp_path, progress=False, stop_after=1)
    with pytest.raises(ConfigError, match=r"config changed.*fed\.local_steps \(2 -> 5\)"):
        simulate(config.apply_overrides(cfg, ["fed.local_steps=5"]), tmp_path, progress=False, resume=True)
    longer = simulate(config.apply_overrides(cfg, ["fed.rounds=3"]), tmp_path, progress=False, resume=True)
    assert longer["rounds"] == 3 and [r["round"] for r in rows(tmp_path)] == [1, 2, 3]


def test_resume_refuses_a_checkpoint_with_a_flipped_byte(tiny_cfg, tmp_path):
    cfg = config.apply_overrides(tiny_cfg, ["fed.rounds=2"])
    simulate(cfg, tmp_path, progress=False, stop_after=1)
    path = tmp_path / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="checksum"):
        simulate(cfg, tmp_path, progress=False, resume=True)


def test_a_damaged_metrics_file_is_an_error_naming_the_line(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\nnot json\n{"round": 2}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:2"):
        run.read_metrics()
    (tmp_path / "metrics.jsonl").write_bytes(b'{"round": 1}\n\xff\xfe\n')
    with pytest.raises(DataError, match="not UTF-8"):
        run.read_metrics()
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2, "trai')  # a kill mid-write
    assert run.read_metrics() == [{"round": 1}]


def test_finetune_resumes_to_the_same_result_through_the_same_shell(tiny_cfg, tmp_path, assert_same_run):
    cfg = config.apply_overrides(tiny_cfg, ["train.steps=4", "train.eval_every=2"])
    full = finetune(cfg, tmp_path / "full", progress=False)
    finetune(config.apply_overrides(cfg, ["train.steps=2"]), tmp_path / "cut", progress=False)  # checkpoint at 2
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as handle:  # step 3 ran, then a kill mid-write
        handle.write('{"step": 3, "train_loss": 0.69}\n{"step": 4, "tr')
    resumed = finetune(cfg, tmp_path / "cut", progress=False, resume=True)
    assert resumed["final/accuracy"] == full["final/accuracy"]
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    (tmp_path / "cut" / "summary.json").unlink()  # killed after its last checkpoint: resume reports, not lies
    again = finetune(cfg, tmp_path / "cut", progress=False, resume=True)
    assert again["final/accuracy"] == full["final/accuracy"]
    with pytest.raises(ConfigError, match="already holds a run"):
        finetune(cfg, tmp_path / "full", progress=False)


def test_cli_run_into_an_existing_run_is_one_line_and_nonzero(tiny_cfg, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(config.apply_overrides(tiny_cfg, ["fed.rounds=1"])))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]


def test_a_shared_zero_shot_is_copied_with_its_source_and_a_missing_one_is_an_error(tiny_cfg, tmp_path):
    from meerkat_fl import run as shell

    first = RunDir.create(tmp_path / "first", tiny_cfg)
    assert shell.begin(first, resumed_round=None, evaluate=lambda: {"accuracy": 0.25}) == {"accuracy": 0.25}
    second = RunDir.create(tmp_path / "second", tiny_cfg)
    evaluated = []
    got = shell.begin(second, resumed_round=None, evaluate=lambda: evaluated.append(1) or {"accuracy": 0.9},
                      zero_shot_from=first.path)
    assert got == {"accuracy": 0.25} and not evaluated  # shared, not re-evaluated
    saved = json.loads((second.path / "zero_shot.json").read_text())
    assert saved == {"zero_shot/accuracy": 0.25, "copied_from": str(first.path)}
    empty = RunDir.create(tmp_path / "empty", tiny_cfg)
    with pytest.raises(ConfigError, match="no zero-shot evaluation to share"):
        shell.begin(RunDir.create(tmp_path / "third", tiny_cfg), resumed_round=None,
                    evaluate=lambda: {"accuracy": 0.9}, zero_shot_from=empty.path)
