"""The decoding forward pass: a prompt prefix shared by every row, cached once, and a KV cache
per row that the decode loop writes one slot at a time.

Why not `Llama.hidden` with its cache: there the cache goes through the layer scan as xs and
comes back as ys, so every decode step writes a fresh copy of the whole cache, and attention
transposes each layer's keys and values to heads-first again; at batch 32 with a 3-shot prompt
that is ~3 GB of memory traffic a step against 0.54 GB of weights. Here a decode step runs the
layers unrolled, each reading its own heads-first cache arrays (`[B, K, S, E]` per layer) and,
on the CPU, its own weight arrays (`layer_views`), so nothing is sliced out of a stack and
copied; the step's new keys and values (one slot per row) are written in place after it.

The shared prefix (few-shot examples, a fixed instruction) is prefilled once for a single row,
`[N, K, P, E]`, and every row's queries attend to it with one batched matmul over the heads.

Attention keys are three parts, concatenated before one softmax: the prefix (all visible),
the row cache (slots already written), and the tokens of this call (causal). Positions are
those the whole prompt would have alone: the prefix is 0..P-1, each row's own tokens follow.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft.kernels import linear
from jaxft.model import apply_rope, rope_inv_freq, rope_sin_cos

_NEG = float(jnp.finfo(jnp.float32).min)


class Prefix(NamedTuple):
    """A prefilled prompt prefix: its token ids and keys/values `[N, K, P, E]` (P may be 0)."""
    ids: tuple[int, ...]
    k_NxKxPxE: jax.Array
    v_NxKxPxE: jax.Array


class RowCache(NamedTuple):
    """Per-row keys and values, one array `[B, K, S, E]` per layer (a decode step reads and
    writes each layer's own buffer: no slices of a stacked cache, no copies of it), and which
    slots hold a real token `[B, S]`."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    ok_BxS: jax.Array


class Static:
    """A GraphDef made hashable for jit's static arguments (ModelConfig, inside it, is a plain
    dataclass): two models of the same structure share compiles."""

    def __init__(self, graphdef):
        self.graphdef, self._key = graphdef, repr(graphdef)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Static) and self._key == other._key


def _scores(q_BxKxGxLxE, k, spec):
    # Scaled after the dot, as `jaxft.kernels.attention` does: the same rounding.
    s = jnp.einsum(spec, q_BxKxGxLxE, k, preferred_element_type=jnp.float32)
    return s / math.sqrt(q_BxKxGxLxE.shape[-1])


def _prefix_scores(q_BxKxGxLxE, k_KxPxE):
    """Scores against the shared prefix as one batched matmul per kv head, [K, B*G*L, P]
    (XLA's CPU dot is fast with the batch axis leading), returned as [B, K, G, L, P]."""
    b, kh, g, l, e = q_BxKxGxLxE.shape
    q_KxMxE = q_BxKxGxLxE.transpose(1, 0, 2, 3, 4).reshape(kh, b * g * l, e)
    s = _scores(q_KxMxE, k_KxPxE, "kme,kpe->kmp")
    return s.reshape(kh, b, g, l, -1).transpose(1, 0, 2, 3, 4)


def _prefix_values(p_BxKxGxLxP, v_KxPxE):
    b, kh, g, l, n = p_BxKxGxLxP.shape
    p_KxMxP = p_BxKxGxLxP.transpose(1, 0, 2, 3, 4).reshape(kh, b * g * l, n)
    o = jnp.einsum("kmp,kpe->kme", p_KxMxP.astype(v_KxPxE.dtype), v_KxPxE,
                   preferred_element_type=jnp.float32)
    return o.reshape(kh, b, g, l, -1).transpose(1, 0, 2, 3, 4)


def _attend(q_BxLxHxE, k_self, v_self, self_ok_BxLxL, prefix_kv, row):
    """Softmax attention over [prefix, row cache, this call's tokens]; `prefix_kv` is
    (k, v) `[K, P, E]` or None, `row` is (k, v `[B, K, S, E]`, ok `[B, S]`) or None."""
    b, l, h, e = q_BxLxHxE.shape
    kh = k_self.shape[1]
    q = q_BxLxHxE.reshape(b, l, kh, h // kh, e).transpose(0, 2, 3, 1, 4)
    parts, values = [], []
    if prefix_kv is not None and prefix_kv[0].shape[1]:
        parts.append(_prefix_scores(q, prefix_kv[0]))
        values.append(lambda p, v=prefix_kv[1]: _prefix_values(p, v))
    if row is not None:
        s = _scores(q, row[0], "bkgle,bkse->bkgls")
        parts.append(jnp.where(row[2][:, None, None, None, :], s, _NEG))
        values.append(lambda p, v=row[1]: _row_values(p, v))
    s = _scores(q, k_self, "bkgle,bkse->bkgls")
    parts.append(jnp.where(self_ok_BxLxL[:, None, None], s, _NEG))
    values.append(lambda p, v=v_self: _row_values(p, v))
    p = jax.nn.softmax(jnp.concatenate(parts, axis=-1), axis=-1)
    o, lo = 0.0, 0
    for value, part in zip(values, parts):
        n = part.shape[-1]
        o = o + value(p[..., lo:lo + n])
        lo += n
    return o.astype(q_BxLxHxE.dtype).transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)


def _row_values(p_BxKxGxLxS, v_BxKxSxE):
    return jnp.einsum("bkgls,bkse->bkgle", p_BxKxGxLxS.astype(v_BxKxSxE.dtype), v_BxKxSxE,
                      preferred_element_type=jnp.float32)


def _block(blk, x_BxLxD, sin, cos, self_ok_BxLxL, prefix_kv, row):
    """One decoder layer (the arithmetic of `jaxft.model.Block`); also returns this call's
    keys and values heads-first, `[B, K, L, E]`, for the caller to cache."""
    at, dt = blk.attn, blk.attn.dtype
    b, l, d = x_BxLxD.shape
    hn = blk.attn_norm(x_BxLxD)
    w_q, w_k, w_v = (w[...].astype(dt) for w in (at.wq_DxHxE, at.wk_DxKxE, at.wv_DxKxE))
    q = linear(hn, w_q.reshape(d, -1)).reshape(b, l, *w_q.shape[1:])
    k = linear(hn, w_k.reshape(d, -1)).reshape(b, l, *w_k.shape[1:])
    v = linear(hn, w_v.reshape(d, -1)).reshape(b, l, *w_v.shape[1:])
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    o = _attend(q, k, v, self_ok_BxLxL, prefix_kv, row)
    x_BxLxD = x_BxLxD + linear(o.reshape(b, l, -1), at.wo_HxExD[...].astype(dt).reshape(-1, d))
    return x_BxLxD + blk.mlp(blk.mlp_norm(x_BxLxD)), k, v


def layer_views(model) -> tuple | None:
    """Each layer's weights as arrays of their own that share the stacked buffers (no copy), or
    None where that is not possible (weights sharded over devices, or not on the CPU).

    Why: XLA's CPU backend copies a layer's slice of the stacked weights (in a scan or
    unrolled) before its matmuls. A token step at small batch is bound by reading the weights
    once, and the copy roughly doubles that traffic (measured in bench/RESULTS.md)."""
    _, state = nnx.split(model.blocks)
    devices = {d for x in jax.tree.leaves(state) for d in x.sharding.device_set}
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    device = devices.pop()
    host = jax.tree.map(np.asarray, state)  # views of the device buffers on the CPU
    return tuple(jax.tree.map(lambda x, i=i: jax.device_put(x[i], device), host)
                 for i in range(model.cfg.n_layers))


def forward(model, ids_BxL, pos_BxL, self_ok_BxLxL, prefix: Prefix | None = None,
            row: RowCache | None = None, layers: tuple | None = None):
    """Final-norm hidden states `[B, L, D]` and this call's keys/values `[N, B, K, L, E]`.

    A prefill (no `row`) scans the layers over the stacked weights. A decode step (with `row`)
    runs them unrolled, each on its own cache arrays and on `layers[i]` (from `layer_views`)
    or, without those, on a slice of the stacked weights."""
    cfg, dt = model.cfg, jnp.dtype(model.cfg.dtype)
    sin, cos = rope_sin_cos(pos_BxL, rope_inv_freq(cfg))
    x_BxLxD = model.embed_VxD[...].astype(dt)[ids_BxL]
    graphdef, block_state = nnx.split(model.blocks)
    pre = None if prefix is None else (prefix.k_NxKxPxE, prefix.v_NxKxPxE)

    def layer(x, state, pre_kv, row_l):
        return _block(nnx.merge(graphdef, state), x, sin, cos, self_ok_BxLxL, pre_kv, row_l)

    if row is None:
        def scanned(x, xs):
            x, k, v = layer(x, *xs, None)
            return x, (k, v)

        x_BxLxD, (k_new, v_new) = jax.lax.scan(scanned, x_BxLxD, (block_state, pre))
        return model.final_norm(x_BxLxD), k_new, v_new
    ks, vs = [], []
    for i in range(cfg.n_layers):
        state = layers[i] if layers is not None else jax.tree.map(lambda w: w[i], block_state)
        pre_kv = None if pre is None else (pre[0][i], pre[1][i])
        x_BxLxD, k, v = layer(x_BxLxD, state, pre_kv, (row.k[i], row.v[i], row.ok_BxS))
        ks.append(k)
        vs.append(v)
    return model.final_norm(x_BxLxD), jnp.stack(ks), jnp.stack(vs)


def causal_ok(valid_BxL) -> jax.Array:
    """Query i may see this call's key j <= i that is a real token; every query sees itself
    (a padding slot must see something; real queries never see padding)."""
    l = valid_BxL.shape[1]
    tri = jnp.tril(jnp.ones((l, l), bool))
    return (tri[None] & valid_BxL[:, None, :]) | jnp.eye(l, dtype=bool)[None]


@partial(jax.jit, static_argnums=0)
def _prefill_prefix(graphdef, state, ids_1xP):
    model = nnx.merge(graphdef.graphdef, state)
    p = ids_1xP.shape[1]
    pos = jnp.arange(p, dtype=jnp.int32)[None]
    _, k, v = forward(model, ids_1xP, pos, causal_ok(jnp.ones((1, p), bool)))
    return k[:, 0], v[:, 0]


def prefill_prefix(model, ids: list[int]) -> Prefix:
    """Keys and values of a prefix every prompt starts with, computed once for one row."""
    graphdef, state = nnx.split(model)
    if not ids:
        cfg = model.cfg
        z = jnp.zeros((cfg.n_layers, cfg.n_kv_heads, 0, cfg.head_size), jnp.dtype(cfg.dtype))
        return Prefix((), z, z)
    k, v = _prefill_prefix(Static(graphdef), state, jnp.asarray([ids], jnp.int32))
    return Prefix(tuple(ids), k, v)
