"""Model directories: atomic writes, --force, config and params round trips."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxft import modeldir, state
from jaxft.config import ConfigError, MeshConfig
from jaxft.errors import OutputExistsError
from jaxft.sharding import make_mesh


def test_atomic_dir_leaves_nothing_on_error_and_needs_force(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError):
        with modeldir.atomic_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []  # neither out nor its temp dir
    with modeldir.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputExistsError, match="pass --force"):
        with modeldir.atomic_dir(out):
            pass
    with modeldir.atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]


def test_save_and_load_model_round_trip(tmp_path, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, vocab_size=500)
    model = state.init_model(cfg, make_mesh(MeshConfig(fsdp=8)), seed=4)
    modeldir.save_model(tmp_path / "m", model)
    assert modeldir.read_config(tmp_path / "m") == cfg
    back = state.load_model(tmp_path / "m")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_allclose(np.asarray(back(ids)), np.asarray(model(ids)), rtol=1e-5, atol=1e-5)


def test_not_a_model_dir_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path} is not a jaxft model directory: config.json is missing"):
        modeldir.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="the model directory has no tokenizer"):
        (tmp_path / "config.json").write_text("{}")
        state.load(tmp_path, need_tokenizer=True)
