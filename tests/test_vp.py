"""GradIP and Meerkat-vp: the inner product, detection on synthetic trajectories, early stopping, resume."""

import json
import math

import numpy as np
import pytest
import torch

from meerkat_fl import cli, config
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.fed.strategies import ClientInstructions, MeerkatVPStrategy
from meerkat_fl.local import DataPointer
from meerkat_fl.masks import build_mask, calibration_batches, pretraining_gradients
from meerkat_fl.noise import LEGACY
from meerkat_fl.patch import load_patch
from meerkat_fl.vp import (
    GRADIP_LOG,
    DetectionSettings,
    detection_signals,
    late_window_at,
    path_gradip,
    precision_recall,
    random_stop_set,
    trajectories_from_records,
)
from meerkat_fl.zo import MaskedParams, noise


@pytest.fixture(scope="module")
def calibration(tiny, calibration_text):
    return calibration_batches(tiny.tokenizer, calibration_text, num_sequences=4, seq_len=32, batch_size=2)


def test_gradip_equals_the_dense_pretraining_gradient_dotted_with_the_zo_gradient(tiny, calibration):
    mask = build_mask(tiny.model, "sensitive", 0.05, fingerprint=tiny.fingerprint, calibration=calibration)
    _, dense_grads = pretraining_gradients(tiny.model, mask.names, calibration)
    seed, scalar = 1234, -0.37
    # z rebuilt by perturbing the model (values + 1*z), independently of vp's own noise loop
    params = MaskedParams(tiny.model, mask)
    values = params.gather()
    params.write(values, seed=seed, scale=1.0)
    z = params.gather() - values
    params.write(values)
    torch.testing.assert_close(z, noise(seed, mask), rtol=0, atol=1e-5)
    # the ZO gradient g * (z ⊙ m) scattered into full tensors, dotted with the dense gradient
    explicit, offset = 0.0, 0
    for grad, idx, size in zip(dense_grads, mask.indices, mask.sizes):
        zo_grad = torch.zeros(grad.numel(), dtype=torch.float64)
        zo_grad[idx] = scalar * z[offset : offset + size].double()
        explicit += float(grad.reshape(-1).double() @ zo_grad)
        offset += size
    gradip, cosine = path_gradip(mask, [seed], [scalar], noise=params.noise, cosine=True)
    assert gradip[0] == pytest.approx(explicit, rel=1e-4)
    assert explicit != 0.0 and -1.0 <= cosine[0] <= 1.0
    assert path_gradip(mask, [seed], [-scalar], noise=params.noise)[0][0] == -gradip[0]  # signed form


def test_gradip_without_a_pretraining_gradient_is_a_config_error(tiny):
    mask = build_mask(tiny.model, "random", 0.01, fingerprint=tiny.fingerprint)
    with pytest.raises(ConfigError, match="sensitive"):
        path_gradip(mask, [1], [1.0], noise=LEGACY)


def decaying(rng, steps=100):
    return rng.normal(0, 1, steps) * np.exp(-np.arange(steps) / 10.0)


def oscillating(rng, steps=100):
    return rng.normal(0, 1, steps)


def test_detection_flags_decaying_trajectories_and_not_oscillating_ones():
    rng = np.random.default_rng(0)
    for _ in range(20):
        flat = detection_signals(decaying(rng), (0, 20), (50, 100), 0.1, 5.0, 0.5)
        noisy = detection_signals(oscillating(rng), (0, 20), (50, 100), 0.1, 5.0, 0.5)
        assert flat.flagged and flat.rho_later > 20 and flat.rho_quiet > 0.9
        assert not noisy.flagged and noisy.rho_later < 2


def test_detection_on_degenerate_trajectories_never_flags():
    assert not detection_signals(np.zeros(100), (0, 20), (50, 100), 0.1, 5.0, 0.5).flagged
    short = detection_signals(np.ones(30), (0, 20), (50, 100), 0.1, 5.0, 0.5)
    assert math.isnan(short.rho_later) and not short.flagged


def test_late_window_slides_to_the_most_recent_steps():
    assert late_window_at(100, (50, 100)) == (50, 100)
    assert late_window_at(130, (50, 100)) == (80, 130)


def test_precision_and_recall():
    assert precision_recall([0, 1, 5], [0, 1, 2, 3]) == (2 / 3, 0.5)
    p, r = precision_recall([], [0])
    assert math.isnan(p) and r == 0.0


def settings():
    return DetectionSettings.from_vp(config.VPConfig(calibration_steps=100, early_window=(0, 20), late_window=(50, 100)))


def synthetic_rounds(strategy, rounds, steps_per_round, extreme, seed=0):
    rng = np.random.default_rng(seed)
    paths = {cid: (decaying(rng, 400) if cid in extreme else oscillating(rng, 400)) for cid in strategy.client_ids}
    metrics = []
    for r in range(rounds):
        metrics.append(strategy.observe(r, {c: p[r * steps_per_round : (r + 1) * steps_per_round]
                                            for c, p in paths.items()}))
    return metrics


def test_strategy_stops_detected_clients_after_calibration_only():
    strategy = MeerkatVPStrategy(range(6), settings(), recheck_every=5)
    metrics = synthetic_rounds(strategy, 12, 10, extreme={1, 4})
    assert metrics[8]["vp_stopped"] == [] and metrics[9]["vp_stopped"] == [1, 4]  # classified at 100 steps
    told = strategy.configure(12, [0, 1], ClientInstructions(lr=1e-3, local_steps=10))
    assert told[1] == ClientInstructions(1e-3, 1) and told[0] == ClientInstructions(1e-3, 10)
    assert "vp_signals" in metrics[9] and metrics[9]["vp_classified"] == 6


def test_random_control_stops_as_many_clients_as_detection_would_reproducibly():
    detect = MeerkatVPStrategy(range(8), settings(), recheck_every=5)
    synthetic_rounds(detect, 10, 10, extreme={1, 4, 6})
    chosen = []
    for seed in range(5):
        control = MeerkatVPStrategy(range(8), settings(), recheck_every=5, control="random", seed=seed)
        synthetic_rounds(control, 10, 10, extreme={1, 4, 6})
        assert control.detected == detect.detected == [1, 4, 6]
        assert len(control.stopped) == 3 and control.stopped == random_stop_set(range(8), 3, seed)
        chosen.append(tuple(control.stopped))
    assert len(set(chosen)) > 1  # a different seed draws a different set
    assert random_stop_set(range(8), 2, 0) == [c for c in random_stop_set(range(8), 3, 0) if c in
                                               random_stop_set(range(8), 2, 0)]  # nested: no churn


def test_strategy_state_round_trips():
    strategy = MeerkatVPStrategy(range(4), settings(), recheck_every=5)
    synthetic_rounds(strategy, 11, 10, extreme={2})
    restored = MeerkatVPStrategy(range(4), settings(), recheck_every=5)
    tensors, state = strategy.state_dict()
    restored.load_state_dict(tensors, json.loads(json.dumps(state)))
    assert restored.trajectories == strategy.trajectories and restored.stopped == strategy.stopped == [2]
    assert restored.detected == strategy.detected


def test_config_validates_vp_windows_and_mask():
    with pytest.raises(ConfigError, match="vp.late_window"):
        config.load(None, ["vp.late_window=[50, 120]"])
    with pytest.raises(ConfigError, match="meerkat_vp"):
        config.load(None, ["fed.strategy=meerkat_vp", "mask.kind=random"])


@pytest.fixture()
def vp_cfg(tiny_cfg, calibration_text):
    """Meerkat-vp on the tiny federation, a sensitive mask, calibration in 2 rounds; thresholds 0 flag all."""
    return config.apply_overrides(tiny_cfg, [
        "mask.kind=sensitive", f"mask.calibration={calibration_text!r}",
        "mask.calibration_sequences=4", "mask.calibration_seq_len=32", "mask.density=0.02",
        "fed.strategy=meerkat_vp", "fed.local_steps=2", "fed.rounds=4", "fed.partition=mixture",
        "fed.num_extreme=2", "vp.calibration_steps=4", "vp.early_window=[0, 1]", "vp.late_window=[2, 4]",
        "vp.rho_later=0", "vp.rho_quiet=0", "vp.recheck_every=2", "run.eval_every=0", "run.zero_shot=false",
        "task.eval_size=16",
    ])


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stopped_clients_run_one_step_per_round_and_their_data_pointer_advances(vp_cfg, tmp_path):
    built = []
    simulate(vp_cfg, tmp_path, progress=False, on_built=built.append)
    metrics = read_lines(tmp_path / "metrics.jsonl")
    assert metrics[0]["vp_stopped"] == [] and metrics[1]["vp_stopped"] == [0, 1, 2, 3]  # at 4 steps of 2
    rows = read_lines(tmp_path / GRADIP_LOG)  # one GradIP per scalar each client sent
    assert len(rows) == 4 * 4
    assert all(len(r["gradip"]) == (2 if r["round"] <= 2 else 1) for r in rows)
    # every client's pointer walked batch_size examples per step it ran: 2 + 2 + 1 + 1
    for client in built[0].clients.values():
        expected = DataPointer(client.pointer.size, client.pointer.seed)
        for _ in range(6):
            expected.next_batch(vp_cfg.zo.batch_size)
        assert client.pointer.state() == expected.state() != {"epoch": 0, "position": 0}


def test_plain_meerkat_logs_gradip_and_meerkat_gradip_reports_it(vp_cfg, tmp_path, capsys):
    cfg = config.apply_overrides(vp_cfg, ["fed.strategy=meerkat", "fed.rounds=2", "vp.gradip_cosine=true"])
    simulate(cfg, tmp_path, progress=False)
    rows = read_lines(tmp_path / GRADIP_LOG)
    assert len(rows) == 2 * 4 and all(len(r["cosine"]) == 2 for r in rows)
    trajectories = trajectories_from_records(rows)
    assert sorted(trajectories) == [0, 1, 2, 3] and all(t.size == 4 for t in trajectories.values())
    assert cli.main(["gradip", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "g.png").stat().st_size > 0
    assert "| 0 | extreme | 4 |" in printed and "| 3 | dirichlet | 4 |" in printed
    assert "precision 0.50, recall 1.00" in printed  # thresholds 0 flag all 4 clients, 2 of them extreme


def test_resume_of_a_meerkat_vp_run_equals_an_uninterrupted_run(vp_cfg, tmp_path):
    cfg = config.apply_overrides(vp_cfg, ["vp.rho_later=1", "vp.control=random"])
    full = simulate(cfg, tmp_path / "full", progress=False)
    assert simulate(cfg, tmp_path / "cut", progress=False, stop_after=3) == {"interrupted_at_round": 3}
    stopped = [row["vp_stopped"] for row in read_lines(tmp_path / "full" / "metrics.jsonl")]
    assert stopped[0] == [] and stopped[2] and stopped[2] != stopped[3]  # stopping, then a re-check at round 4
    resumed = simulate(cfg, tmp_path / "cut", progress=False, resume=True)
    assert torch.equal(load_patch(tmp_path / "full" / "patch.safetensors").values,
                       load_patch(tmp_path / "cut" / "patch.safetensors").values)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(read_lines(tmp_path / "full" / "metrics.jsonl")) == strip(read_lines(tmp_path / "cut" / "metrics.jsonl"))
    assert read_lines(tmp_path / "full" / GRADIP_LOG) == read_lines(tmp_path / "cut" / GRADIP_LOG)
    assert resumed["final/accuracy"] == full["final/accuracy"]
