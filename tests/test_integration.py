"""On the embedded SmolLM2-135M and real SST-2: sparse ZO learns, centrally and federated.

Marked `integration`: minutes, not seconds. The mask uses a reduced calibration set to stay quick.
"""

import numpy as np
import pytest

from meerkat_fl import config
from meerkat_fl.build import build_task_data, make_mask
from meerkat_fl.fed.simulate import simulate
from meerkat_fl.local import DataPointer, local_train, step_seeds
from meerkat_fl.masks import save_mask
from meerkat_fl.zo import MaskedParams

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm_mask(smollm, data_dir, tmp_path_factory):
    cfg = config.resolve_environment(config.load(None, ["mask.calibration_sequences=8"]), {"MEERKAT_DATA_DIR": data_dir})
    mask = make_mask(cfg.mask, smollm)
    path = save_mask(mask, tmp_path_factory.mktemp("mask") / "mask.safetensors")
    return mask, path


def test_short_sparse_zo_run_lowers_the_sst2_training_loss(smollm, smollm_mask, data_dir):
    mask, _ = smollm_mask
    cfg = config.load(None, [f"task.data_dir={data_dir!r}", "task.train_size=64", "task.max_length=48"])
    data = build_task_data(cfg.task, smollm, seed=0)
    params = MaskedParams(smollm.model, mask)
    start = params.gather()
    everything = np.arange(len(data.train))

    def train_loss() -> float:
        return float(np.mean([data.scorer.loss(data.train.batch(rows)) for rows in np.array_split(everything, 4)]))

    before = train_loss()
    values = start.clone()
    try:
        local_train(params, values, step_seeds(0, 0, 0, 30), lr=1e-3, eps=1e-3,
                    batch_loss=lambda rows: data.scorer.loss(data.train.batch(rows)),
                    pointer=DataPointer(len(data.train), seed=0), batch_size=8)
        after = train_loss()
    finally:
        params.write(start)  # the session model is shared
    assert after < before - 0.05, (before, after)


def test_a_few_meerkat_rounds_raise_sst2_accuracy_over_zero_shot(smollm_mask, data_dir, tmp_path):
    _, mask_path = smollm_mask
    cfg = config.load(None, [
        f"task.data_dir={data_dir!r}", f"mask.path={str(mask_path)!r}", "task.train_size=400",
        "task.eval_size=200", "task.max_length=48", "task.eval_batch_size=50", "zo.lr=1e-3", "zo.batch_size=8",
        "fed.num_clients=4", "fed.rounds=4", "fed.local_steps=5", "fed.alpha=0.5", "run.eval_every=4",
    ])
    summary = simulate(cfg, tmp_path, progress=False)
    assert summary["final/accuracy"] > summary["zero_shot/accuracy"] + 0.03, summary
    assert summary["bytes_up_per_round"] < 4 * 300  # 4 clients x (5 scalars + 5 losses + header)
