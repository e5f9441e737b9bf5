import re

import pytest

from ciss.config import ConfigError, RECIPES, from_dict, load_config, parse_set, to_dict


def test_defaults_recipe_file_and_set_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: ft\noptim:\n  epochs: 7\n  lr: 0.5\n")
    cfg = load_config(f, ["optim.lr=0.2", "data.options={size: 32}"], recipe="cpu")
    assert cfg.optim.epochs == 7  # file beats recipe
    assert cfg.optim.lr == 0.2  # --set beats file
    assert cfg.data.crop_size == RECIPES["cpu"]["data"]["crop_size"]  # recipe beats defaults
    assert cfg.data.options == {"size": 32}
    assert cfg.recipe == "cpu"


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(None, ["optim.epochs=abc"])
    with pytest.raises(ConfigError, match="recipe"):
        load_config(None, [], recipe="nope")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["novalue"])


def test_round_trip_through_dict():
    cfg = load_config(None, ["method=joint", "seed=3"], recipe="tiny")
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "0.001", ".001", "1e-03"])
def test_every_float_notation_is_a_float(tmp_path, text):
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == pytest.approx(0.001)
    f = tmp_path / "c.yaml"
    f.write_text(f"optim:\n  weight_decay: {text}\n")
    assert load_config(f).optim.weight_decay == pytest.approx(0.001)


def test_a_float_key_refuses_words():
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'abc'"):
        load_config(None, ["optim.lr=abc"])


@pytest.mark.parametrize("item,message", [
    ("optim.epochs_next=abc", "optim.epochs_next: expected int, got 'abc'"),
    ("optim.grad_clip=abc", "optim.grad_clip: expected a number, got 'abc'"),
    ("method_args=abc", "method_args: expected a mapping"),
    ("optim.epochs=0", "optim.epochs must be at least 1, got 0"),
    ("optim.epochs_next=0", "optim.epochs_next must be at least 1"),
    ("optim.batch_size=0", "optim.batch_size must be at least 1, got 0"),
    ("optim.lr=-1", "optim.lr must be positive, got -1.0"),
    ("data.resize=0", "data.resize must be at least 1"),
    ("model.head_reduce=-1", "model.head_reduce must be"),
    ("data.scale=[2.0,0.5]", "data.scale must be a list [low, high]"),
    ("data.scale=[1.0]", "data.scale must be a list [low, high]"),
    ("data.scale=[0,1]", "data.scale must be a list [low, high]"),
    ("data.scale=1.5", "data.scale must be a list [low, high]"),
])
def test_bad_values_are_refused_naming_the_key(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [item])


def test_optional_keys_take_null_and_names_may_look_like_numbers():
    cfg = load_config(None, ["optim.epochs_next=null", "optim.grad_clip=1", "name=2024"])
    assert cfg.optim.epochs_next is None and cfg.optim.grad_clip == 1.0 and cfg.name == "2024"
