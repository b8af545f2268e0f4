"""Tests for meerkat_fl.models: tiny Llama, fingerprints, load errors, the embedded model and its cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from meerkat_fl import models
from meerkat_fl.errors import ConfigError, ModelError
from meerkat_fl.models import LoadedModel, load_model, model_fingerprint, tiny_llama


def _logits(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


def test_tiny_llama_same_seed_gives_identical_weights(tiny: LoadedModel) -> None:
    again = tiny_llama(0)
    for (name, a), (_, b) in zip(tiny.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert again.fingerprint == tiny.fingerprint


def test_tiny_llama_different_seed_gives_different_fingerprint(tiny: LoadedModel) -> None:
    assert tiny_llama(1).fingerprint != tiny.fingerprint


def test_tiny_llama_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_llama(5)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_llama_is_frozen_eval_float32(tiny: LoadedModel) -> None:
    assert not tiny.model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in tiny.model.parameters())
    assert tiny.source == "tiny"
    assert tiny.model.config.vocab_size == len(tiny.tokenizer) == 49152


def test_fingerprint_is_sixteen_hex_chars(tiny: LoadedModel) -> None:
    assert len(tiny.fingerprint) == 16
    int(tiny.fingerprint, 16)


def test_fingerprint_changes_when_a_sampled_weight_changes(tiny: LoadedModel) -> None:
    other = tiny_llama(0)
    with torch.no_grad():
        other.model.model.norm.weight[0] += 1.0
    assert model_fingerprint(other.model) != tiny.fingerprint


def test_fingerprint_equal_before_and_after_bf16_cast(tiny: LoadedModel) -> None:
    cast = load_model("tiny", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in cast.model.parameters())
    assert cast.fingerprint == tiny.fingerprint
    assert model_fingerprint(cast.model) == tiny.fingerprint


def test_tokenizer_pads_right_and_round_trips_great(tiny: LoadedModel) -> None:
    tokenizer = tiny.tokenizer
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"
    ids = tokenizer(" great", add_special_tokens=False).input_ids
    assert len(ids) == 1
    assert tokenizer.decode(ids) == " great"


def test_local_dir_loads_with_same_fingerprint(tiny: LoadedModel, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.source == str(tmp_path)
    assert torch.equal(_logits(loaded, "hello world"), _logits(tiny, "hello world"))


def test_missing_dir_raises_model_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        load_model(str(missing))


def test_missing_gguf_raises_model_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="absent.gguf"):
        load_model(str(tmp_path / "absent.gguf"))


def test_text_file_named_gguf_raises_model_error_and_leaves_no_cache(tmp_path: Path) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_text("not a gguf file\n")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError, match="x.gguf"):
        load_model(str(fake), cache_dir=cache)
    assert [p.name for p in cache.iterdir()] == ["gguf-sha256.json"]


def test_dir_without_model_raises_model_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelError, match="empty-model"):
        load_model(str(tmp_path / "empty-model"))


def test_unreachable_hub_id_raises_model_error_naming_it() -> None:
    with pytest.raises(ModelError, match="nobody/no-such-model.*neither a local dir"):
        load_model("nobody/no-such-model")


def test_unknown_dtype_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="int8"):
        load_model("tiny", dtype="int8")


def test_unknown_device_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="tpu"):
        load_model("tiny", device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_raises_model_error() -> None:
    with pytest.raises(ModelError, match="CUDA is not available"):
        load_model("tiny", device="cuda")


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEERKAT_CACHE", str(tmp_path / "m"))
    assert models.default_cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MEERKAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.default_cache_dir() == tmp_path / "xdg" / "meerkat-fl"


def test_embedded_gguf_path_points_at_the_shipped_file() -> None:
    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.integration
def test_embedded_model_is_dequantised_smollm2(smollm: LoadedModel) -> None:
    assert sum(p.numel() for p in smollm.model.parameters()) == 134_515_008
    assert getattr(smollm.model.config, "quantization_config", None) is None
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in smollm.model.parameters())
    assert smollm.source == "smollm2"


@pytest.mark.integration
def test_embedded_model_warm_load_uses_cache(smollm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hashlib.sha256(models.embedded_gguf_path().read_bytes()).hexdigest()
    assert (models.default_cache_dir() / f"gguf-{sha[:16]}" / "model.safetensors").is_file()

    def refuse(*args: object) -> None:
        raise AssertionError("warm load must not convert the GGUF again")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    again = load_model("smollm2")
    assert again.fingerprint == smollm.fingerprint
    assert torch.equal(_logits(again, "The movie was great"), _logits(smollm, "The movie was great"))


@pytest.mark.integration
def test_embedded_tokenizer_round_trips_great(smollm: LoadedModel) -> None:
    ids = smollm.tokenizer(" great", add_special_tokens=False).input_ids
    assert smollm.tokenizer.decode(ids) == " great"
    assert smollm.tokenizer.padding_side == "right"
