"""Train-state building: vocab growth for added tokens, pretrained init into a sharded layout."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxft import modeldir, sharding, state
from jaxft.config import Config, MeshConfig, OptimConfig, TrainConfig
from jaxft.model import padded_vocab
from jaxft.optim import make_optimizer


@pytest.fixture(scope="module")
def saved(tiny_cfg, tmp_path_factory):
    """A tiny model dir whose vocab (500) is about to grow by 20 added tokens."""
    cfg = dataclasses.replace(tiny_cfg, vocab_size=500)
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    model = state.init_model(cfg, mesh, seed=3)
    d = tmp_path_factory.mktemp("m") / "model"
    modeldir.save_model(d, model)
    return d, cfg, jax.device_get(state.nnx.state(model, state.nnx.Param).to_pure_dict())


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(fsdp=1), MeshConfig(fsdp=4, tensor=2)])
def test_pretrained_params_grow_vocab_at_the_mean(saved, mesh_cfg):
    d, old_cfg, old = saved
    run_cfg = Config(train=TrainConfig(init=str(d)))
    new_cfg = state.model_config(run_cfg, vocab_size=520)
    assert new_cfg.vocab_size == 520 and padded_vocab(new_cfg) == 520  # multiple of 8 for tiny
    devices = jax.devices()[:1] if mesh_cfg.fsdp == 1 else None
    mesh = sharding.make_mesh(mesh_cfg, devices)
    layout = state.make_layout(new_cfg, mesh, make_optimizer(OptimConfig(), 10))
    params = state.pretrained_params(str(d), new_cfg, mesh, layout.params_sh)
    for key in ("embed_VxD", "lm_head_VxD"):  # untied: both grow
        w = np.asarray(params[key])
        assert w.shape == (520, old_cfg.dim)
        assert params[key].sharding == layout.params_sh[key]
        np.testing.assert_array_equal(w[:500], old[key][:500])
        mean = old[key][:500].mean(0)
        np.testing.assert_allclose(w[500:520], np.broadcast_to(mean, (20, old_cfg.dim)), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(params["blocks"]["mlp"]["w_up_DxF"]),
                                  old["blocks"]["mlp"]["w_up_DxF"])


def test_padding_rows_stay_zero_and_smaller_tokenizer_is_an_error(saved):
    d, old_cfg, old = saved
    new_cfg = dataclasses.replace(old_cfg, vocab_size=503)  # pads to 504
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    layout = state.make_layout(new_cfg, mesh, make_optimizer(OptimConfig(), 10))
    params = state.pretrained_params(str(d), new_cfg, mesh, layout.params_sh)
    w = np.asarray(params["embed_VxD"])
    assert w.shape[0] == 504 and np.all(w[503] == 0) and np.all(w[500:503] != 0)
    from jaxft.config import ConfigError
    with pytest.raises(ConfigError, match="larger than the tokenizer"):
        state.pretrained_params(str(d), dataclasses.replace(old_cfg, vocab_size=400), mesh,
                                layout.params_sh)
