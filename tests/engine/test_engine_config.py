"""Typed configs: YAML loading, dotted overrides parsed to the field type, errors, round trip."""

import pytest
from engine_toy import ToyConfig  # registers the "toy" section

from wsss_fast.engine import Config, ConfigError, load_config, save_config


def test_defaults_and_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: sgd\n  lr: 0.01\ntrain:\n  epochs: 7\n")
    cfg = load_config(path)
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.train.epochs == 7
    assert cfg.data == Config().data  # sections not named keep their defaults


def test_overrides_are_parsed_to_field_types(tmp_path):
    cfg = load_config(
        None,
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string; the float field parses it
            "train.epochs=3",
            "train.resume=false",
            "eval.scales=[1.0, 0.5, 1.5]",
            "optim.betas=[0.9, 0.95]",
            "model.pretrained=weights/deit.pth",
            "data.root=123",  # a str field keeps the text, not the int YAML would make of it
            "model.backend=null",
            "optim.grad_clip=1",
        ],
    )
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.resume is False
    assert cfg.eval.scales == (1.0, 0.5, 1.5)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.pretrained == "weights/deit.pth"
    assert cfg.data.root == "123"
    assert cfg.model.backend is None
    assert cfg.optim.grad_clip == 1.0 and type(cfg.optim.grad_clip) is float


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["lrr", "'lr'", "'weight_decay'"]),
        ("optimizer.lr=1", ["optimizer", "'optim'", "'train'"]),
        ("train.epochs=three", ["train.epochs", "integer"]),
        ("train.resume=maybe", ["train.resume", "true or false"]),
        ("optim.betas=[0.9]", ["optim.betas", "2 values"]),
        ("optim.name=adam", ["optim.name", "adamw", "sgd"]),
        ("optim.lr", ["section.key=value"]),
        ("data.resize_long=[300, 200]", ["data.resize_long", "low <= high", "null"]),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "bad-int",
        "bad-bool",
        "tuple-length",
        "choice",
        "no-eq",
        "resize-long-order",
    ],
)
def test_override_errors_name_the_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key.*'epoch'.*valid keys.*'epochs'"):
        load_config(path)
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"'trian'.*valid keys.*'train'"):
        load_config(path)


def test_method_section_is_registered_and_overridable():
    cfg = load_config(None, ["method=toy", "toy.hidden=32", "toy.dropout=0.25"])
    assert cfg.toy == ToyConfig(hidden=32, dropout=0.25)
    assert load_config(None, ["method=toy"]).toy == ToyConfig()
    with pytest.raises(ConfigError, match=r"'hiden'.*'hidden'"):
        load_config(None, ["toy.hiden=3"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "method=toy",
            "toy.hidden=5",
            "eval.scales=[0.5, 1.0]",
            "optim.lr=3e-5",
            "data.resize_long=[230, 292]",
        ],
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.sections["toy"] == ToyConfig(hidden=5)
