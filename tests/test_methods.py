"""The method registry: every method resolves to its settings, contradictions name both keys, old flags work."""

from __future__ import annotations

import pytest

from meerkat_fl import cli, config
from meerkat_fl.errors import ConfigError
from meerkat_fl.fed.strategies import ClientInstructions, FedMeZOStrategy, make_strategy
from meerkat_fl.methods import METHODS, get_method, preset_lr


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_resolves_to_its_fixed_settings_and_round_trips(name, tmp_path):
    cfg = config.load(None, [f"method={name!r}"])
    flat = config.flatten(cfg)
    method = get_method(name)
    assert all(flat[k] == v for k, v in method.fixed.items())
    assert all(flat[k] == v for k, v in method.defaults.items())
    assert cfg.fed.downlink == method.downlinks[0] and config.method_name(cfg) == name
    assert make_strategy(cfg).name == cfg.fed.strategy
    (tmp_path / "c.toml").write_text(config.to_toml(cfg))
    assert config.load(tmp_path / "c.toml") == cfg  # a saved resolved config reloads to itself


@pytest.mark.parametrize("flags,name", [
    ([], "meerkat"), (["mask.kind=dense"], "full_fedzo"), (["mask.kind=random"], "random_mask"),
    (["mask.kind=lora"], "lora_fedzo"), (["fed.strategy=fedmezo", "mask.kind=dense"], "fedmezo"),
    (["fed.strategy=meerkat_vp", "vp.control=random"], "random_stop"),
    (["fedkseed.pool_size=64", "mask.kind=dense", "fed.downlink=pool"], "fedkseed"),
])
def test_old_flag_combinations_keep_their_meaning(flags, name):
    cfg = config.load(None, flags)
    assert cfg.method is None and config.method_name(cfg) == name
    raw = config.flatten(config.apply_overrides(config.Config(), flags))
    assert config.flatten(cfg) == raw | {"fed.downlink": raw["fed.downlink"] or "values"}  # unset: values


def test_a_contradiction_names_both_keys_and_the_method_to_use():
    with pytest.raises(ConfigError, match=r"method 'meerkat' sets mask\.kind='sensitive'.*mask\.kind='dense'.*full_fedzo"):
        config.load(None, ["method=meerkat", "mask.kind=dense"])
    with pytest.raises(ConfigError, match=r"fed\.downlink"):
        config.load(None, ["method=meerkat", "fed.downlink=pool"])
    with pytest.raises(ConfigError, match="method: must be one of meerkat, "):
        config.validate(config.apply_overrides(config.Config(), ["method=nope"]))


def test_user_keys_override_a_methods_defaults():
    cfg = config.load(None, ["method=fedmezo", "mask.kind=lora"])  # FedMeZO's own setting
    assert cfg.mask.kind == "lora" and cfg.fed.strategy == "fedmezo"
    cfg = config.load(None, ["method=fedkseed", "fedkseed.pool_size=64", "fed.downlink=values"])
    assert (cfg.fedkseed.pool_size, cfg.fed.downlink) == (64, "values")


def test_preset_lr_scales_inversely_with_density():
    meerkat = get_method("meerkat")
    assert preset_lr(meerkat, meerkat.density) == meerkat.lr
    assert preset_lr(meerkat, 1e-2) == pytest.approx(meerkat.lr / 10)
    assert preset_lr(get_method("full_fedzo"), 1.0) == get_method("full_fedzo").lr


def test_methods_command_lists_every_method(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in METHODS)


def test_fedmezo_configure_keeps_no_state_between_calls():
    strategy = FedMeZOStrategy("last_loss", lr_scale=1e-3)
    strategy.phi = {0: 1.0, 1: -1.0}
    a = strategy.configure(0, [0, 1, 2], ClientInstructions(lr=1e-2, local_steps=3))
    b = strategy.configure(0, [0, 1, 2], ClientInstructions(lr=5e-3, local_steps=3))
    assert a[0].lr == pytest.approx(1.1e-2) and a[1].lr == pytest.approx(9e-3) and a[2].lr == 1e-2
    assert b[0].lr == pytest.approx(6e-3) and b[2].lr == 5e-3  # the second call's base, not the first's
    assert strategy.state_dict()[1]["phi"] == {"0": 1.0, "1": -1.0}
