"""Progress bars (round/step, loss, last eval, bytes; --quiet; on a terminal only by default) and TensorBoard
logging of metrics.jsonl (``run.tensorboard = true``), resume included."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from meerkat_fl import cli, config
from meerkat_fl.build import build_model, build_task_data
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.finetune import finetune
from meerkat_fl.flower.launch import show_rounds
from meerkat_fl.progress import bar, short_bytes
from meerkat_fl.tensorboard_log import scalars
from meerkat_fl.tune import tune

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def board(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run's tensorboard/ folder, as TensorBoard reads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_board(lines: list[dict], step_key: str) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numbers by tag, as float32 (what TensorBoard stores)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for tag, value in scalars(line).items():
            out.setdefault(tag, []).append((line[step_key], float(np.float32(value))))
    return out


def tiny(*overrides: str) -> config.Config:
    return config.validate(config.load(TINY, list(overrides)))


# --- TensorBoard -----------------------------------------------------------------------------------------------
def test_scalars_flatten_nested_metrics_to_tags_and_leave_out_what_is_not_a_number():
    line = {"round": 2, "train_loss": 0.5, "bytes_up": 10, "eval/accuracy": 0.75, "clients": [0, 1],
            "train_loss_by_client": {"3": 0.4, "7": None}, "rejected": {"1": "bad seed"}, "flag": True,
            "clip": {"bound": 2.0, "by_client": {"0": 1}}}
    assert scalars(line) == {"train_loss": 0.5, "bytes_up": 10.0, "eval/accuracy": 0.75,
                             "train_loss_by_client/3": 0.4, "clip/bound": 2.0, "clip/by_client/0": 1.0}


def test_tensorboard_holds_every_metric_of_metrics_jsonl_at_its_round(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    simulate(tiny("run.tensorboard=true"), run, progress=False)
    lines = rows(run)
    found = board(run)
    assert found == expected_board(lines, "round")
    assert [step for step, _ in found["eval/accuracy"]] == [1, 2, 3]
    assert found["train_loss"] == [(r["round"], float(np.float32(r["train_loss"]))) for r in lines]
    clients = [tag for tag in found if tag.startswith("train_loss_by_client/")]
    assert clients and {"bytes_up", "bytes_down", "eval/loss"} <= set(found)


def test_finetune_logs_its_steps_from_the_zero_shot_at_step_0(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "ft"
    finetune(tiny("run.tensorboard=true", "train.steps=4", "train.eval_every=2"), run, progress=False)
    found = board(run)
    assert found == expected_board(rows(run), "step")
    assert [step for step, _ in found["eval/accuracy"]] == [0, 2, 4]


def test_a_resumed_run_keeps_no_tensorboard_step_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    cfg = tiny("run.tensorboard=true")
    simulate(cfg, tmp_path / "straight", progress=False)
    cut = tmp_path / "cut"
    simulate(cfg, cut, progress=False, stop_after=2)  # a checkpoint at round 2
    # round 3 ran and was logged, then a kill before its checkpoint
    with open(cut / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"round": 3, "train_loss": 99.0}) + "\n")
    with SummaryWriter(str(cut / "tensorboard")) as writer:
        writer.add_scalar("train_loss", 99.0, 3)
        writer.add_scalar("lost_metric", 1.0, 3)
    simulate(cfg, cut, progress=False, resume=True)
    found, straight = board(cut), board(tmp_path / "straight")
    assert found == expected_board(rows(cut), "round")
    assert [step for step, _ in found["train_loss"]] == [1, 2, 3] and "lost_metric" not in found
    assert 99.0 not in [value for _, value in found["train_loss"]]
    without_time = lambda tags: {tag: values for tag, values in tags.items() if tag != "seconds"}
    assert without_time(found) == without_time(straight)


def test_tensorboard_without_the_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an install without the extra looks like
    with pytest.raises(ConfigError, match=r"meerkat-fl\[tensorboard\]"):
        simulate(tiny("run.tensorboard=true"), tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    assert cli.main(["run", str(TINY), "--set", "run.tensorboard=true", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'meerkat-fl[tensorboard]'" in err[0]


# --- progress bars ----------------------------------------------------------------------------------------------
def test_short_bytes():
    assert [short_bytes(n) for n in (512, 1536, 2_500_000, 3e9)] == ["512B", "1.5KB", "2.5MB", "3.0GB"]


def test_run_bar_shows_round_loss_last_eval_and_bytes(tmp_path, capsys):
    simulate(tiny(), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    total = sum(r["bytes_up"] + r["bytes_down"] for r in rows(tmp_path / "run"))
    last = rows(tmp_path / "run")[-1]
    final = err.split("\r")[-1]  # the bar's last state (leave=True)
    assert "3/3" in final and f"loss={last['train_loss']:.4f}" in final
    assert f"eval/accuracy={last['eval/accuracy']:.4f}" in final and f"bytes={short_bytes(total)}" in final


def test_a_resumed_run_bar_counts_the_bytes_and_eval_of_its_earlier_rounds(tmp_path, capsys):
    cfg = tiny("run.eval_every=2", "fed.rounds=3")
    simulate(cfg, tmp_path / "run", progress=False, stop_after=2)
    simulate(cfg, tmp_path / "run", progress=True, resume=True)
    final = capsys.readouterr().err.split("\r")[-1]
    lines = rows(tmp_path / "run")
    assert f"bytes={short_bytes(sum(r['bytes_up'] + r['bytes_down'] for r in lines))}" in final
    assert f"eval/accuracy={lines[-1]['eval/accuracy']:.4f}" in final


def test_finetune_bar_shows_step_loss_and_last_eval(tmp_path, capsys):
    finetune(tiny("train.steps=3", "train.eval_every=2"), tmp_path / "ft", progress=True)
    final = capsys.readouterr().err.split("\r")[-1]
    last = rows(tmp_path / "ft")
    assert "3/3" in final and f"loss={last[-1]['train_loss']:.4f}" in final
    assert f"eval/accuracy={last[-1]['eval/accuracy']:.4f}" in final and "bytes" not in final


def test_quiet_run_writes_no_bar_and_a_redirected_stderr_gets_none_either(tmp_path, capsys, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(tiny("fed.rounds=1")))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert "round" not in capsys.readouterr().err
    assert cli.main(["run", str(path), "--out", str(tmp_path / "pipe")]) == 0  # stderr is not a terminal
    assert "round" not in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert cli.main(["run", str(path), "--out", str(tmp_path / "tty")]) == 0
    assert "1/1" in capsys.readouterr().err


def test_eval_and_mask_show_a_bar_on_a_terminal_unless_quiet(tmp_path, capsys, monkeypatch, calibration_text):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    mask = ["mask", "--model", "tiny", "--kind", "sensitive", "--calibration", calibration_text, "--sequences", "8",
            "--seq-len", "16", "--out"]
    assert cli.main([*mask, str(tmp_path / "m.safetensors")]) == 0
    assert "calibration: 100%" in capsys.readouterr().err  # 8 sequences in batches of 4: 2/2
    assert cli.main([*mask, str(tmp_path / "q.safetensors"), "--quiet"]) == 0
    assert "calibration" not in capsys.readouterr().err
    assert cli.main(["eval", "--config", str(TINY)]) == 0
    captured = capsys.readouterr()
    assert "eval:" in captured.err and "row" in captured.err and '"accuracy"' in captured.out
    assert cli.main(["eval", "--config", str(TINY), "--quiet"]) == 0
    assert "eval:" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_a_run_building_its_own_mask_shows_the_calibration_bar_unless_quiet(tmp_path, capsys, monkeypatch, command,
                                                                            calibration_text):
    from meerkat_fl import build

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(tiny("mask.kind=sensitive", f"mask.calibration={calibration_text}",
                                         "mask.calibration_sequences=8", "mask.calibration_seq_len=16",
                                         "fed.rounds=1", "train.steps=1", "run.zero_shot=false")))
    for name, quiet in (("shown", []), ("quiet", ["--quiet"])):
        cache = tmp_path / f"cache-{name}"  # an empty mask cache: the run builds the mask itself
        monkeypatch.setattr(build, "default_cache_dir", lambda cache=cache: cache)
        argv = [command, *(["--config"] if command == "finetune" else []), str(path), "--out", str(tmp_path / name)]
        assert cli.main([*argv, *quiet]) == 0
        err = capsys.readouterr().err
        assert len(list((cache / "masks").glob("sensitive-*.safetensors"))) == 1  # built here, not loaded
        if quiet:
            assert "calibration" not in err
        else:
            assert "calibration: 100%" in err  # 8 sequences in batches of 4: 2/2


def test_eval_bar_counts_every_test_row(capsys, monkeypatch):
    from meerkat_fl.tasks import base

    made = []
    monkeypatch.setattr(base, "bar", lambda *args, **kwargs: made.append(bar(*args, **kwargs)) or made[-1])
    cfg = tiny()
    data = build_task_data(cfg.task, build_model(cfg), cfg.run.seed)
    quiet = data.scorer.evaluate(data.test, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
    assert data.scorer.evaluate(data.test, batch_size=8, progress=True) == quiet
    assert "eval:" in capsys.readouterr().err
    assert len(made) == 2 and (made[1].n, made[1].total) == (len(data.test), len(data.test))


def test_tune_bar_shows_points_and_the_best_so_far(tmp_path, capsys):
    base = config.resolve_environment(config.load(TINY, ["fed.rounds=1"]))
    results = tune(base, tmp_path / "sweep", {"zo.lr": [1e-3, 2e-3]}, progress=True)
    final = [line for line in capsys.readouterr().err.split("\r") if line.startswith("tune")][-1]
    best = max(results, key=lambda r: r.score)
    assert "2/2" in final and f"score={best.score:.4f}" in final


def test_flower_bar_follows_the_run_folders_metrics(tmp_path, capsys):
    lines = [{"round": 1, "train_loss": 0.7, "bytes_up": 1000, "bytes_down": 500, "eval/accuracy": 0.5},
             {"round": 2, "train_loss": 0.6, "bytes_up": 1000, "bytes_down": 500}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"round": 3, "tr')
    rounds = bar(4, "flower", "round", True)
    show_rounds(rounds, tmp_path)  # the unfinished last line is a round still being written
    assert rounds.n == 2
    assert rounds.postfix == "loss=0.6000, eval/accuracy=0.5000, bytes=3.0KB"
    rounds.close()
