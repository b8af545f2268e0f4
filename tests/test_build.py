"""Task data for runs: seeded subsamples and the validation split held out of training data."""

from __future__ import annotations

import numpy as np
import pytest

from meerkat_fl.build import build_task_data, hold_out
from meerkat_fl.config import TaskConfig
from meerkat_fl.errors import DataError
from meerkat_fl.tasks import ClassificationData


def prompts_of(data) -> set[tuple[int, ...]]:
    return {tuple(ids) for ids in data.token_ids}


def test_hold_out_is_disjoint_and_independent_of_run_seed():
    data = ClassificationData([f"text {i}" for i in range(100)], np.arange(100) % 2, "synthetic")
    rest, validation = hold_out(data, 20)
    assert len(validation) == 20 and len(rest) == 80
    assert set(rest.prompts).isdisjoint(validation.prompts)
    assert set(rest.prompts) | set(validation.prompts) == set(data.prompts)
    assert hold_out(data, 20)[1].prompts == validation.prompts
    with pytest.raises(DataError, match="validation_size"):
        hold_out(data, 100)


def test_validation_split_never_overlaps_training_examples(tiny):
    cfg = TaskConfig(name="synthetic", train_size=300, eval_size=50, eval_split="validation",
                     validation_size=400, max_length=32)
    first, second = build_task_data(cfg, tiny, seed=0), build_task_data(cfg, tiny, seed=1)
    assert len(first.test.token_ids) == 50 and len(first.train.token_ids) == 300
    assert prompts_of(first.train).isdisjoint(prompts_of(first.test))
    assert prompts_of(second.train).isdisjoint(prompts_of(first.test) | prompts_of(second.test))
    test_cfg = TaskConfig(name="synthetic", train_size=300, eval_size=50, max_length=32)
    assert prompts_of(build_task_data(test_cfg, tiny, seed=0).test) != prompts_of(first.test)
