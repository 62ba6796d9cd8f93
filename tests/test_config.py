import re

import pytest

from jaxft.config import ConfigError, check_batch_split, load_config


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\noptim: {learning_rate: 1.0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "learning_rate" in msg and "lr" in msg and "warmup_steps" in msg


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps.*int"):
        load_config(None, ["preset=tiny", "train.steps=many"])


def test_overrides_are_typed_and_preset_resolved():
    cfg = load_config("configs/tiny-viggo.yaml", ["optim.lr=0.5", "model.dim=32", "data.limit=7"])
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dim == 32 and cfg.model.n_layers == 2  # the rest comes from the preset
    assert cfg.data.limit == 7


def test_unknown_preset_and_bad_choice():
    with pytest.raises(ConfigError, match="llama2-7b"):
        load_config(None, ["preset=llama9"])
    with pytest.raises(ConfigError, match="pack, longest, max_length"):
        load_config(None, ["preset=tiny", "data.padding=bucket"])


def test_batch_split_is_one_rule_with_every_factor_named():
    check_batch_split(24, grad_accum=2, data_parallel=4, processes=2)
    with pytest.raises(ConfigError, match=r"data.batch_size=12 must be divisible by "
                                          r"optim.grad_accum \(2\) times the data-parallel devices \(4\)"):
        check_batch_split(12, grad_accum=2, data_parallel=4)
    with pytest.raises(ConfigError, match="by the 5 processes"):
        check_batch_split(8, processes=5)
    with pytest.raises(ConfigError, match="optim.grad_accum=0 must be >= 1"):
        check_batch_split(8, grad_accum=0)
    with pytest.raises(ConfigError, match=r"data.batch_size=6 must be divisible by optim.grad_accum \(4\)"):
        load_config(None, ["preset=tiny", "data.batch_size=6", "optim.grad_accum=4"])


def test_numbers_coerce_one_way():
    cfg = load_config(None, ["preset=tiny", "train.steps=7", "optim.lr=3", "optim.eps=1e-6"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.optim.eps) == (7, 3.0, 1e-6)
    assert type(cfg.optim.lr) is float and type(cfg.train.steps) is int
    for bad, what in (("train.steps=1.5", "expected an int"), ("optim.lr=fast", "expected a number"),
                      ("train.steps=true", "expected an int")):
        with pytest.raises(ConfigError, match=f"config.train.steps: {what}|config.optim.lr: {what}"):
            load_config(None, ["preset=tiny", bad])


@pytest.mark.parametrize("override,message", [
    ("train.steps=0", "train.steps=0 must be >= 1"),
    ("train.steps=-5", "train.steps=-5 must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("optim.grad_accum=0", "optim.grad_accum=0 must be >= 1"),
    ("train.keep=0", "train.keep=0 must be >= 1"),
    ("data.max_length=1", "data.max_length=1 must be >= 2"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1"),
    ("optim.lr=-1e-4", "optim.lr=-0.0001 must be a finite number > 0"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.b2=1.5", "optim.b2=1.5 must be between 0.0 and"),
    ("model.n_heads=3", "model.n_heads=3 must be a multiple of n_kv_heads=2"),
    ("model.n_kv_heads=0", "model.n_kv_heads=0 must be >= 1"),
])
def test_nonsense_numbers_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["preset=tiny", override])


def test_dim_must_split_into_heads_unless_head_dim_is_set():
    with pytest.raises(ConfigError, match=r"model.dim=66 must be a multiple of n_heads=4"):
        load_config(None, ["preset=tiny", "model.dim=66"])
    assert load_config(None, ["preset=tiny", "model.dim=66", "model.head_dim=16"]).model.head_dim == 16


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("preset: tiny\ndata:\n  batch_size: [8\n  max_length: 64\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(p))}:\d+: not valid YAML"):
        load_config(p)
