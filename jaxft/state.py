"""The train state and where it lives: params (a pure dict of arrays), optimizer state, step.

Everything is created or restored directly into its shards: shapes come from `eval_shape`,
shardings from `jaxft.sharding`, values from a jitted init, a checkpoint, or a model dir.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxft import modeldir, sharding
from jaxft.config import Config, ConfigError, ModelConfig
from jaxft.model import Llama, padded_vocab


@dataclass
class Layout:
    """Static facts of a run: the model graph, the optimizer, and every array's sharding."""
    cfg: ModelConfig
    mesh: Mesh
    graphdef: Any
    tx: optax.GradientTransformation
    params_sh: dict  # pure dict of NamedSharding, same tree as params
    opt_sh: Any  # same tree as the optimizer state
    abs_params: dict  # ShapeDtypeStructs with shardings
    abs_opt: Any


def make_layout(cfg: ModelConfig, mesh: Mesh, tx: optax.GradientTransformation) -> Layout:
    graphdef, abs_state = sharding.abstract_model(cfg, mesh)
    abs_params = abs_state.to_pure_dict()
    params_sh = jax.tree.map(lambda a: a.sharding, abs_params)
    abs_opt = jax.eval_shape(tx.init, abs_params)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, params_sh,
                                   transform_non_params=lambda _: rep)
    abs_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abs_opt, opt_sh)
    return Layout(cfg, mesh, graphdef, tx, params_sh, opt_sh, abs_params, abs_opt)


def init_params(layout: Layout, seed: int) -> dict:
    cfg = layout.cfg

    @partial(jax.jit, out_shardings=layout.params_sh)
    def init():
        return nnx.state(Llama(cfg, nnx.Rngs(seed)), nnx.Param).to_pure_dict()

    return init()


def init_opt(layout: Layout, params: dict):
    return jax.jit(layout.tx.init, out_shardings=layout.opt_sh)(params)


def grow_vocab(params: dict, old: ModelConfig, new: ModelConfig, params_sh: dict) -> dict:
    """Adds rows for new tokens (initialised at the mean of the existing rows) to the embedding
    and, when untied, the lm_head; rows past the real vocab (padding) stay zero."""
    n_new, pad = new.vocab_size - old.vocab_size, padded_vocab(new) - new.vocab_size

    def grow(w_VxD):
        real = w_VxD[: old.vocab_size]
        mean = jnp.mean(real.astype(jnp.float32), axis=0, keepdims=True).astype(w_VxD.dtype)
        return jnp.concatenate([real, jnp.repeat(mean, n_new, 0),
                                jnp.zeros((pad, w_VxD.shape[1]), w_VxD.dtype)])

    @partial(jax.jit, out_shardings=params_sh)
    def f(p):
        p = dict(p)
        for k in ("embed_VxD", "lm_head_VxD"):
            if k in p:
                p[k] = grow(p[k])
        return p

    return f(params)


def pretrained_params(init_dir: str, cfg: ModelConfig, mesh: Mesh, params_sh: dict) -> dict:
    """Loads a model dir into `cfg`'s layout, growing the vocab for added special tokens."""
    base = modeldir.read_config(init_dir)
    if base.vocab_size > cfg.vocab_size:
        raise ConfigError(f"{init_dir}: its vocab ({base.vocab_size}) is larger than the tokenizer's "
                          f"({cfg.vocab_size})")
    _, abs_state = sharding.abstract_model(base, mesh)
    params = modeldir.load_params(init_dir, abs_state.to_pure_dict())
    if base.vocab_size == cfg.vocab_size:
        return params
    return grow_vocab(params, base, cfg, params_sh)


def model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    """The run's model config: from the init model dir if fine-tuning (dtype/remat from the run
    config), else the preset; vocab grown to the tokenizer's size."""
    m = cfg.model
    if cfg.train.init:
        base = modeldir.read_config(cfg.train.init)
        m = dataclasses.replace(base, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat)
        vocab_size = max(vocab_size, base.vocab_size)
    return dataclasses.replace(m, vocab_size=vocab_size)
