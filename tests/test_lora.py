"""LoRA-FedZO: PEFT adapters as the trainable coordinates, through the unchanged ZO and federated code."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meerkat_fl import config
from meerkat_fl.build import obtain_trainable
from meerkat_fl.cli import main
from meerkat_fl.errors import ConfigError, MaskMismatch
from meerkat_fl.fed.aggregate import client_endpoint
from meerkat_fl.fed.messages import ClientPath
from meerkat_fl.fed.simulate import build_federation, simulate
from meerkat_fl.local import DataPointer, local_train
from meerkat_fl.lora import adapter_names, add_lora, has_lora
from meerkat_fl.models import load_model, tiny_llama
from meerkat_fl.patch import apply_patch, export_merged, load_patch, merge_patch, save_patch
from meerkat_fl.zo import MaskedParams, apply_step

TOKENS = torch.randint(0, 1000, (4, 12), generator=torch.Generator().manual_seed(0))
SETTINGS = {"rank": 4, "alpha": 8.0, "targets": ("q_proj", "v_proj")}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def lm_loss(model: torch.nn.Module):
    def batch_loss(rows: np.ndarray) -> float:
        with torch.no_grad():
            batch = TOKENS[torch.from_numpy(rows)]
            return float(model(input_ids=batch, labels=batch).loss)

    return batch_loss


@pytest.fixture()
def lora_cfg(tiny_cfg):
    return config.apply_overrides(tiny_cfg, ["mask.kind=lora", "lora.rank=4"])


def test_two_independent_builds_with_the_same_run_seed_give_identical_adapters():
    cfg = config.load(None, ["mask.kind=lora", "run.seed=7"])
    a, b, c = tiny_llama(0), tiny_llama(0), tiny_llama(0)
    mask_a, mask_b = obtain_trainable(cfg, a), obtain_trainable(cfg, b)
    mask_c = obtain_trainable(config.apply_overrides(cfg, ["run.seed=8"]), c)
    assert mask_a.names == mask_b.names and mask_a.fingerprint == a.fingerprint
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    values_a, values_c = MaskedParams(a.model, mask_a).gather(), MaskedParams(c.model, mask_c).gather()
    a_parts = [n for n in mask_a.names if ".lora_A." in n]
    assert a_parts and not torch.equal(values_a, values_c)  # A follows the run seed
    for name, part in zip(mask_a.names, values_a.split(mask_a.sizes)):
        assert bool((part == 0).all()) == (".lora_B." in name), name  # B zero, A random


def test_the_lora_mask_is_every_a_and_b_weight_and_nothing_else():
    model = tiny_llama(0).model
    mask = add_lora(model, fingerprint="f", seed=0, **SETTINGS)
    assert mask.kind == "lora" and all(idx is None for idx in mask.indices)
    assert list(mask.names) == adapter_names(model)
    assert len(mask.names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    hidden, kv = 64, 32  # tiny: q 64 -> 64, v 64 -> 32
    assert mask.size == 2 * ((4 * hidden + hidden * 4) + (4 * hidden + kv * 4))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_local_training_changes_both_a_and_b_and_leaves_base_weights_bit_identical():
    model = tiny_llama(0).model
    mask = add_lora(model, fingerprint="f", seed=0, **SETTINGS)
    params = MaskedParams(model, mask)
    adapters = set(mask.names)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in adapters}
    start = params.gather()
    values = start.clone()
    local_train(params, values, [11, 12, 13], lr=1e-2, eps=1e-3, batch_loss=lm_loss(model),
                pointer=DataPointer(len(TOKENS), seed=0), batch_size=2)
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name
    assert torch.equal(params.gather(), values)
    for name, old, new in zip(mask.names, start.split(mask.sizes), values.split(mask.sizes)):
        assert not torch.equal(old, new), name  # ZO perturbs and updates A and B alike


def test_server_replay_reproduces_each_clients_adapter_values_bit_for_bit(lora_cfg):
    fed = build_federation(lora_cfg)
    assert fed.params.mask.kind == "lora"
    start = fed.server.values.clone()
    plans, _ = fed.server.configure_round()
    for cid, plan in plans.items():
        update = fed.clients[cid].fit(plan, fed.runtime)
        trained = fed.params.gather()
        path = ClientPath(0, cid, 1.0, plan.lr, plan.seeds, update.scalars)
        assert torch.equal(client_endpoint(start, fed.params.mask, path, noise=fed.params.noise), trained)
        assert not torch.equal(trained, start)


def test_lora_run_resumes_to_the_same_patch_which_reproduces_the_trained_model(lora_cfg, tmp_path):
    built = []
    summary = simulate(lora_cfg, tmp_path / "full", progress=False, on_built=built.append)
    assert summary["method"] == "lora_fedzo" and summary["mask_kind"] == "lora"
    assert summary["trainable_values"] == built[0].params.size
    assert summary["bytes_up_per_round"] > 0
    interrupted = simulate(lora_cfg, tmp_path / "resumed", progress=False, stop_after=1)
    assert interrupted == {"interrupted_at_round": 1}
    simulate(lora_cfg, tmp_path / "resumed", resume=True, progress=False)
    full = load_patch(tmp_path / "full" / "patch.safetensors")
    resumed = load_patch(tmp_path / "resumed" / "patch.safetensors")
    assert torch.equal(full.values, resumed.values)

    fed = built[0]
    fed.params.write(fed.server.values)
    trained = logits(fed.data.scorer.model)
    fresh = tiny_llama(0)
    base = logits(fresh.model)
    apply_patch(fresh.model, full, fresh.fingerprint)
    assert torch.equal(logits(fresh.model), trained)
    assert not torch.allclose(trained, base)  # training moved B off zero


def test_finetune_trains_lora_adapters_into_a_lora_patch(lora_cfg, tmp_path):
    from meerkat_fl.finetune import finetune

    cfg = config.apply_overrides(lora_cfg, ["train.steps=2", "train.eval_every=0", "run.zero_shot=false"])
    summary = finetune(cfg, tmp_path / "ft", progress=False)
    patch = load_patch(tmp_path / "ft" / "patch.safetensors")
    assert summary["method"] == "mezo_lora" and patch.mask.kind == "lora"
    assert patch.values.numel() == summary["trainable_values"]


def trained_lora_patch(tmp_path: Path):
    """A tiny model with adapters moved off their init (B non-zero), and its patch."""
    loaded = tiny_llama(0)
    mask = add_lora(loaded.model, fingerprint=loaded.fingerprint, seed=0, **SETTINGS)
    params = MaskedParams(loaded.model, mask)
    values = apply_step(params.gather(), mask, seed=5, scalar=50.0, lr=1e-2, noise=params.noise)
    params.write(values)
    return loaded, load_patch(save_patch(tmp_path / "lora.safetensors", mask, values))


def test_merged_export_matches_the_adapter_model(tmp_path):
    adapted, patch = trained_lora_patch(tmp_path)
    expected = logits(adapted.model)
    fresh = tiny_llama(0)
    merged = merge_patch(fresh.model, patch, fresh.fingerprint)
    assert not has_lora(merged) and not torch.allclose(logits(merged), logits(tiny_llama(0).model))
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)

    other = tiny_llama(0)
    out = export_merged(other.model, other.tokenizer, patch, other.fingerprint, tmp_path / "merged")
    reloaded = load_model(str(out))
    assert not has_lora(reloaded.model)
    torch.testing.assert_close(logits(reloaded.model), expected, rtol=0, atol=1e-5)


def test_lora_patch_for_another_base_model_is_refused(tmp_path):
    _, patch = trained_lora_patch(tmp_path)
    other = tiny_llama(1)
    with pytest.raises(MaskMismatch, match="patch"):
        apply_patch(other.model, patch, other.fingerprint)
    assert not has_lora(other.model)


@pytest.mark.parametrize(("override", "key"), [
    ("lora.rank=0", "lora.rank"), ("lora.alpha=-1", "lora.alpha"),
    ("lora.targets=[]", "lora.targets"), ("lora.targets='q_proj'", "lora.targets"),
    ("mask.kind=lora_adapters", "mask.kind"),
])
def test_bad_lora_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        config.load(None, ["mask.kind=lora", override])


def test_lora_with_a_mask_file_is_refused():
    with pytest.raises(ConfigError, match="mask.path"):
        config.load(None, ["mask.kind=lora", "mask.path=m.safetensors"])


@pytest.mark.parametrize("targets", [("q_proj", "qproj"), ("embed_tokens",), ("lm_head",)])  # tiny: tied head
def test_a_target_that_matches_no_decoder_linear_is_refused_by_name(targets):
    model = tiny_llama(0).model
    with pytest.raises(ConfigError, match=repr(targets[-1])):
        add_lora(model, fingerprint="f", rank=4, alpha=8.0, targets=targets)
    assert not has_lora(model)


def test_an_adapter_on_an_untied_output_head_changes_the_task_loss():
    # Tasks score through the model's forward, so an (untied) head is a LoRA target like any block linear.
    from transformers import LlamaConfig, LlamaForCausalLM

    from meerkat_fl.tasks import get_task

    tiny = tiny_llama(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**tiny.model.config.to_dict(), "tie_word_embeddings": False})).eval()
    task = get_task("synthetic")
    batch = task.encode(tiny.tokenizer, task.load("test").subset(range(8)), 48).batch(range(8))
    before = task.loss(model, batch)
    mask = add_lora(model, fingerprint="f", seed=0, rank=4, alpha=8.0, targets=("lm_head",))
    assert mask.names and all("lm_head" in name for name in mask.names)
    assert task.loss(model, batch) == before  # B = 0: the adapted model starts as the base model
    params = MaskedParams(model, mask)
    params.write(params.gather(), seed=1, scale=1e-1)  # move A and B
    assert task.loss(model, batch) != before


def test_adapters_cannot_be_injected_twice():
    model = tiny_llama(0).model
    add_lora(model, fingerprint="f", seed=0, **SETTINGS)
    with pytest.raises(ConfigError, match="already carries"):
        add_lora(model, fingerprint="f", seed=0, **SETTINGS)


def test_lora_targets_override_and_toml_round_trip(tmp_path):
    cfg = config.load(None, ["mask.kind=lora", 'lora.targets=["q_proj", "self_attn.k_proj"]'])
    assert cfg.lora.targets == ("q_proj", "self_attn.k_proj")
    (tmp_path / "c.toml").write_text(config.to_toml(cfg))
    assert config.load(tmp_path / "c.toml") == cfg
    assert config.method_name(config.apply_overrides(cfg, ["fed.strategy=fedmezo"])) == "fedmezo"  # on LoRA


def test_cli_run_eval_and_export_a_lora_fedzo_run(tmp_path, capsys):
    tiny_toml = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    common = ["--set", "mask.kind=lora"]
    out = str(tmp_path / "run")
    assert main(["run", tiny_toml, *common, "--set", "fed.rounds=1", "--out", out, "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "lora_fedzo"
    patch = str(tmp_path / "run" / "patch.safetensors")
    capsys.readouterr()
    assert main(["eval", "--config", tiny_toml, *common, "--patch", patch]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["accuracy"], printed["loss"]) == (summary["final/accuracy"], summary["final/loss"])
    assert main(["export", "--model", "tiny", "--patch", patch, "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()
