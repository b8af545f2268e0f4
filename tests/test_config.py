"""Config: TOML, dotted overrides, validation naming the key, resolved round trip."""

import logging

import pytest

from meerkat_fl import config, config_checks
from meerkat_fl.errors import ConfigError


def test_overrides_use_toml_values():
    cfg = config.load(None, ["fed.rounds=7", "zo.lr=1e-3", "task.name=ag_news", "task.eval_size=none",
                             "vp.early_window=[0, 10]"])
    assert cfg.fed.rounds == 7 and cfg.zo.lr == 1e-3 and cfg.task.name == "ag_news"
    assert cfg.task.eval_size is None and cfg.vp.early_window == (0, 10)


def test_int_is_accepted_for_float():
    assert config.load(None, ["zo.eps=1"]).zo.eps == 1.0


@pytest.mark.parametrize("override,key", [
    ("fed.roundz=3", "fed.roundz"),
    ("nope.x=1", "nope"),
    ("fed.rounds=ten", "fed.rounds"),
    ("fed.rounds=1.5", "fed.rounds"),
    ("mask.kind=sparse", "mask.kind"),
    ("mask.density=2", "mask.density"),
    ("zo.eps=0", "zo.eps"),
    ("fed.sample_count=99", "fed.sample_count"),
    ("zo.lr=nan", "zo.lr"),
    ("zo.eps=inf", "zo.eps"),
    ("fedmezo.lr_scale=nan", "fedmezo.lr_scale"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [override])


def test_toml_file_round_trip(tmp_path):
    cfg = config.load(None, ["fed.rounds=3", "mask.kind=dense", "vp.late_window=[40, 80]", "task.eval_size=none",
                             "fed.sample_count=2"])
    assert cfg.task.eval_size is None  # a None whose default is not None must survive the file
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(cfg))
    assert config.load(path) == cfg


def test_bad_toml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[fed\nrounds=")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.load(path)
    with pytest.raises(ConfigError, match="missing.toml"):
        config.load(tmp_path / "missing.toml")


def test_environment_fills_data_dir_only_at_the_boundary(tmp_path):
    (tmp_path / "calibration" / "wikitext-2").mkdir(parents=True)
    cfg = config.resolve_environment(config.Config(), {"MEERKAT_DATA_DIR": str(tmp_path)})
    assert cfg.task.data_dir == str(tmp_path)
    assert cfg.mask.calibration.endswith("wikitext-2")
    assert config.Config().task.data_dir is None


def test_one_override_grammar_for_set_flower_run_config_and_node_config():
    pytest.importorskip("flwr", reason="needs the [flower] extra")
    from meerkat_fl.flower.node import NodeSettings
    from meerkat_fl.flower.server_app import config_from_run_config

    cfg = config_from_run_config({
        "meerkat-config": "[fed]\nrounds = 7\n", "fed.local_steps": 3, "lora.targets": '["q_proj", "k_proj"]',
        "method": "lora_fedzo", "set": """zo.lr=1e-3 'task.name="ag_news"'""", "out": "runs/x",
    })
    assert (cfg.fed.rounds, cfg.fed.local_steps, cfg.zo.lr, cfg.task.name) == (7, 3, 1e-3, "ag_news")
    assert cfg.lora.targets == ("q_proj", "k_proj") and cfg.mask.kind == "lora"
    same = config.load(None, ["fed.rounds=7", "fed.local_steps=3", "method=lora_fedzo", "zo.lr=1e-3",
                              "task.name=ag_news", 'lora.targets=["q_proj", "k_proj"]'])
    assert cfg == same
    node = NodeSettings.from_node_config({"partition-id": 0, "task.data_dir": "/data", "model-source": "tiny"})
    assert set(node.overrides) == {'task.data_dir="/data"', 'model.source="tiny"'}
    with pytest.raises(ConfigError, match="a node may set only"):
        NodeSettings.from_node_config({"partition-id": 0, "zo.lr": 1.0})


@pytest.mark.parametrize(("overrides", "warned"), [
    (["model.dtype='bf16'", "zo.eps=1e-3"], True),
    (["model.dtype='bfloat16'", "zo.eps=1e-3"], True),
    (["model.dtype='bfloat16'", "zo.eps=1e-2"], False),
    (["model.dtype='float32'", "zo.eps=1e-3"], False),
    (["model.dtype='fp16'", "zo.eps=1e-3"], False),
    (["model.dtype='bf16'", "zo.eps=1e-3", "method='fedavg_fo'"], False),  # first order: eps is not used
])
def test_bf16_with_an_eps_below_its_rounding_warns_once(overrides, warned, caplog):
    config_checks._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="meerkat_fl.config_checks"):
        config.validate(config.load(None, overrides))
        config.validate(config.load(None, overrides))
    assert caplog.text.count("bf16 rounding") == int(warned)
