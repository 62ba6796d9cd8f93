"""Llama in Flax NNX: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Layers are stored stacked (a leading `layers` axis on every block param) and run with
`lax.scan`, so compile time does not grow with depth. Every param carries logical axis names
in its `axes` metadata; `jaxft.sharding` maps them to mesh axes.

Shape letters: B batch, L query length, S key length (cache slots), D model width, H query
heads, K kv heads, G = H // K, E head width, F MLP width, V vocab, N layers. The matmul,
attention and loss kernels live in `jaxft.kernels`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import sharding
from jaxft.config import ModelConfig
from jaxft.kernels import CausalSegments, attention, linear

# The params whose rows are the vocabulary (padded to `padded_vocab`), by their names in the
# params dict (the attributes of `Llama`): converters, vocab growth and weight decay key on them.
EMBED, LM_HEAD = "embed_VxD", "lm_head_VxD"
VOCAB_PARAMS = (EMBED, LM_HEAD)

Cache = dict[str, Any]  # k_NxBxSxKxE, v_NxBxSxKxE, segment_ids_BxS, index (int32 scalar)


def padded_vocab(cfg: ModelConfig) -> int:
    m = cfg.vocab_multiple
    return -(-cfg.vocab_size // m) * m


def _dtype(name: str):
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, shape, axes, dtype, std: float | None = None, ones=False) -> nnx.Param:
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


# ---------------------------------------------------------------- rotary embeddings

def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the half-rotation (HF) layout, with optional Llama-3 scaling."""
    e = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float32) / e))
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", "llama3") == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif sc:
        raise ValueError(f"unsupported rope_scaling type {sc.get('rope_type')!r}; only llama3 is implemented")
    return inv.astype(np.float32)


def rope_sin_cos(positions_BxL: jax.Array, inv_freq: np.ndarray):
    ang_BxLxE2 = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(ang_BxLxE2), jnp.cos(ang_BxLxE2)


def apply_rope(x_BxLxHxE: jax.Array, sin_BxLxE2, cos_BxLxE2) -> jax.Array:
    x1, x2 = jnp.split(x_BxLxHxE.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_BxLxE2[:, :, None, :], cos_BxLxE2[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxE.dtype)


# ---------------------------------------------------------------- modules

def rms_norm(x_BxLxD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (w_D.astype(jnp.float32) * x).astype(x_BxLxD.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        axes = ("layers",) * len(stack) + ("norm",)
        self.weight = _param(rngs, (*stack, cfg.dim), axes, _dtype(cfg.param_dtype), ones=True)
        self.eps = cfg.norm_eps

    def __call__(self, x_BxLxD):
        return rms_norm(x_BxLxD, self.weight[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        d, h, k, e = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        pd, ls = _dtype(cfg.param_dtype), ("layers",) * len(stack)
        std = 1.0 / math.sqrt(d)
        self.wq_DxHxE = _param(rngs, (*stack, d, h, e), ls + ("embed", "heads", "head_dim"), pd, std)
        self.wk_DxKxE = _param(rngs, (*stack, d, k, e), ls + ("embed", "kv_heads", "head_dim"), pd, std)
        self.wv_DxKxE = _param(rngs, (*stack, d, k, e), ls + ("embed", "kv_heads", "head_dim"), pd, std)
        self.wo_HxExD = _param(rngs, (*stack, h, e, d), ls + ("heads", "head_dim", "embed"), pd,
                               1.0 / math.sqrt(h * e))
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x_BxLxD, sin, cos, mask, kv_cache=None, index=None):
        dt = self.dtype
        b, l, d = x_BxLxD.shape
        w_q, w_k, w_v = (w[...].astype(dt) for w in (self.wq_DxHxE, self.wk_DxKxE, self.wv_DxKxE))
        q = linear(x_BxLxD, w_q.reshape(d, -1)).reshape(b, l, *w_q.shape[1:])
        k = linear(x_BxLxD, w_k.reshape(d, -1)).reshape(b, l, *w_k.shape[1:])
        v = linear(x_BxLxD, w_v.reshape(d, -1)).reshape(b, l, *w_v.shape[1:])
        q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        if kv_cache is not None:  # write this step's keys/values at `index`, attend over all slots
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv_cache = (k, v)
        o_BxLxHxE = attention(q, k.astype(dt), v.astype(dt), mask)
        w_o = self.wo_HxExD[...].astype(dt)
        return linear(o_BxLxHxE.reshape(b, l, -1), w_o.reshape(-1, d)), kv_cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        d, f, pd, ls = cfg.dim, cfg.ffn_dim, _dtype(cfg.param_dtype), ("layers",) * len(stack)
        self.w_gate_DxF = _param(rngs, (*stack, d, f), ls + ("embed", "mlp"), pd, 1 / math.sqrt(d))
        self.w_up_DxF = _param(rngs, (*stack, d, f), ls + ("embed", "mlp"), pd, 1 / math.sqrt(d))
        self.w_down_FxD = _param(rngs, (*stack, f, d), ls + ("mlp", "embed"), pd, 1 / math.sqrt(f))
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x_BxLxD):
        dt = self.dtype
        g = linear(x_BxLxD, self.w_gate_DxF[...].astype(dt))
        u = linear(x_BxLxD, self.w_up_DxF[...].astype(dt))
        return linear(jax.nn.silu(g) * u, self.w_down_FxD[...].astype(dt))


class Block(nnx.Module):
    """One decoder layer. Built with `stack=(N,)` its params hold all N layers."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        self.attn_norm = RMSNorm(cfg, rngs, stack)
        self.attn = Attention(cfg, rngs, stack)
        self.mlp_norm = RMSNorm(cfg, rngs, stack)
        self.mlp = Mlp(cfg, rngs, stack)

    def __call__(self, x_BxLxD, sin, cos, mask, kv_cache=None, index=None):
        a, kv_cache = self.attn(self.attn_norm(x_BxLxD), sin, cos, mask, kv_cache, index)
        x_BxLxD = x_BxLxD + a
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD)), kv_cache


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d, pd = padded_vocab(cfg), cfg.dim, _dtype(cfg.param_dtype)
        self.embed_VxD = _param(rngs, (v, d), ("vocab", "embed"), pd, 1.0)
        self.blocks = Block(cfg, rngs, stack=(cfg.n_layers,))
        self.final_norm = RMSNorm(cfg, rngs)
        # Stored (V, D), not (D, V): the weight-gradient matmul then hits XLA's fast path.
        self.lm_head_VxD = None if cfg.tie_embeddings else _param(
            rngs, (v, d), ("vocab", "embed"), pd, 1.0 / math.sqrt(d))

    def hidden(self, ids_BxL, positions_BxL=None, segment_ids_BxL=None, cache: Cache | None = None):
        """Final-norm hidden states `[B, L, D]` (and the updated cache, when one is given)."""
        cfg, dt = self.cfg, _dtype(self.cfg.dtype)
        b, l = ids_BxL.shape
        index = cache["index"] if cache is not None else 0
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(index + jnp.arange(l, dtype=jnp.int32), (b, l))
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.ones((b, l), jnp.int32)
        # Packed rows: a query sees keys of its own segment at or before its slot. `mask` is
        # implicit for training (CausalSegments) and a bool [B, L, S] against the cache.
        if cache is None:
            mask = CausalSegments(segment_ids_BxL)
        else:
            k_seg_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxL, (0, index))
            q_slot_L, k_slot_S = index + jnp.arange(l), jnp.arange(k_seg_BxS.shape[1])
            mask = ((segment_ids_BxL[:, :, None] == k_seg_BxS[:, None, :])
                    & (k_slot_S[None, None, :] <= q_slot_L[None, :, None]))
        sin, cos = rope_sin_cos(positions_BxL, rope_inv_freq(cfg))
        act = ("batch", "length", "act_embed")
        x_BxLxD = sharding.constrain(self.embed_VxD[...].astype(dt)[ids_BxL], act)

        graphdef, block_state = nnx.split(self.blocks)

        def layer(x, xs):
            state, kv = xs
            x, kv = nnx.merge(graphdef, state)(x, sin, cos, mask, kv, index)
            return sharding.constrain(x, act), kv

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        kv_in = None if cache is None else (cache["k"], cache["v"])
        x_BxLxD, kv_out = jax.lax.scan(layer, x_BxLxD, (block_state, kv_in))
        h_BxLxD = self.final_norm(x_BxLxD)
        if cache is None:
            return h_BxLxD, None
        return h_BxLxD, {"k": kv_out[0], "v": kv_out[1], "segment_ids": k_seg_BxS, "index": index + l}

    def head_VxD(self) -> jax.Array:
        """The output head's rows for the real vocab (padding rows are never scored)."""
        w = self.embed_VxD if self.lm_head_VxD is None else self.lm_head_VxD
        return w[: self.cfg.vocab_size].astype(_dtype(self.cfg.dtype))

    @staticmethod
    def head_input(h_BxLxD) -> jax.Array:
        return sharding.constrain(h_BxLxD, ("batch", "length", "act_embed"))

    def logits(self, h_BxLxD) -> jax.Array:
        """Logits over the real vocab, `[B, L, V]`, in float32."""
        logits = jnp.einsum("bld,vd->blv", self.head_input(h_BxLxD), self.head_VxD(),
                            preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, ids_BxL, positions_BxL=None, segment_ids_BxL=None, cache: Cache | None = None):
        h, new_cache = self.hidden(ids_BxL, positions_BxL, segment_ids_BxL, cache)
        logits_BxLxV = self.logits(h)
        return logits_BxLxV if cache is None else (logits_BxLxV, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        cfg = self.cfg
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_size)
        dt = dtype or _dtype(cfg.dtype)
        return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
                "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.int32(0)}


def param_count(cfg: ModelConfig) -> int:
    d, f, e = cfg.dim, cfg.ffn_dim, cfg.head_size
    per_layer = d * e * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.n_layers * per_layer + cfg.vocab_size * d + head + d
