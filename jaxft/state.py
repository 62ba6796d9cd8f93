"""Models and train state, and where they live: params (a pure dict of arrays), optimizer
state, step. The one place that builds a `Llama`, abstract or real.

Everything is created or restored directly into its shards: shapes come from `eval_shape`,
shardings from `jaxft.sharding`, values from a jitted init, a checkpoint, or a model dir.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxft import modeldir, sharding
from jaxft.config import Config, MeshConfig, ModelConfig
from jaxft.errors import ConfigError
from jaxft.model import VOCAB_PARAMS, Llama, padded_vocab
from jaxft.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("jaxft")


# ---------------------------------------------------------------- building the model

def abstract_state(cfg: ModelConfig):
    """(graphdef, state of ShapeDtypeStructs) of a Llama, without allocating a weight."""
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))


def abstract_params(cfg: ModelConfig) -> dict:
    """The params dict as ShapeDtypeStructs, straight from the model definition."""
    return abstract_state(cfg)[1].to_pure_dict()


def init_model(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> Llama:
    """Builds a Llama whose params are created directly in their shards: the abstract shape
    gives the shardings, and a jitted init writes each shard on its own device."""
    graphdef, abs_state = abstract_state(cfg)
    shardings = sharding.state_shardings(abs_state, mesh)

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(Llama(cfg, nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, init())


def abstract_model(cfg: ModelConfig, mesh: Mesh):
    """The model as ShapeDtypeStructs carrying their target shardings (for restore and plan)."""
    graphdef, abs_state = abstract_state(cfg)
    sh = sharding.state_shardings(abs_state, mesh)
    abs_state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.get_value())),
        abs_state, sh, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, abs_state


def load_model(d: str | os.PathLike, mesh: Mesh | None = None,
               cfg: ModelConfig | None = None) -> Llama:
    """Builds the model from a model dir, each param restored straight into its shard on `mesh`
    (default: the first device)."""
    cfg = cfg or modeldir.read_config(d)
    mesh = mesh or sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    graphdef, abs_state = abstract_model(cfg, mesh)
    abs_state.replace_by_pure_dict(modeldir.load_params(d, abs_state.to_pure_dict()))
    return nnx.merge(graphdef, abs_state)


@dataclass
class Loaded:
    model: Llama  # model(ids_BxL) -> logits [B, L, V]
    tokenizer: Tokenizer | None  # None if the dir has none
    config: ModelConfig


def load(path: str | os.PathLike, mesh: Mesh | None = None, *,
         need_tokenizer: bool = False) -> Loaded:
    """Loads a model directory (from `jaxft convert` or a training run's export); with
    `need_tokenizer`, a dir without one is an error that says so."""
    cfg = modeldir.read_config(path)
    tok_dir = Path(path) / "tokenizer"
    if need_tokenizer and not tok_dir.is_dir():
        raise FileNotFoundError(f"{tok_dir}: the model directory has no tokenizer")
    model = load_model(path, mesh, cfg)
    tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return Loaded(model=model, tokenizer=tok, config=cfg)


# ---------------------------------------------------------------- train state


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
    graphdef, abs_state = abstract_model(cfg, mesh)
    for name, shape, axis in sharding.replicated_dims(abs_state, mesh):
        log.warning("%s %s: its %r dim is not divisible by mesh axes %s, so it is replicated "
                    "on every device", name, list(shape), axis, sharding.RULES[axis])
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
        for k in VOCAB_PARAMS:
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
    _, abs_state = abstract_model(base, mesh)
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
