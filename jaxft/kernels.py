"""The CPU-shaped kernels, and the one switch between them and the accelerators' plain ops.

- `linear` / `weight_grad`: `x @ w` whose weight gradient is a row-major matmul on an explicit
  x^T on the CPU;
- `attention`: grouped-query softmax attention; training's causal, segment-masked path runs in
  query blocks with a flash-style backward (only the row log-sum-exp is saved);
- `token_nll` and `head_loss_sum`: cross-entropy with a fused softmax-minus-one-hot backward,
  and the LM head fused with the loss in token chunks that skip tokens out of the loss (the
  CPU path).

Shape letters are those of `jaxft.model` (B L S D H K G E F V N); M is tokens (B * L) and
C a chunk of them, I and O a matmul's input and output widths.
"""
from __future__ import annotations

import contextvars
import functools
import math
from contextlib import contextmanager
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


# Which code path a trace takes: True for the CPU kernels (`linear`'s VJP, `weight_grad`, the
# fused head+loss), False for the plain XLA ops the accelerators run, None for "the default
# backend decides". Read while tracing, like `sharding.activation_mesh`: a function already
# compiled keeps the path it was traced with.
_CPU_PATH: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "jaxft_cpu_kernels", default=None)


def cpu_kernels() -> bool:
    """Whether the current trace takes the CPU kernels."""
    chosen = _CPU_PATH.get()
    return jax.default_backend() == "cpu" if chosen is None else chosen


@contextmanager
def kernel_path(path: str):
    """Traces under the "cpu" or "accelerator" path whatever the backend (e.g. `jaxft plan`
    compiles an accelerator's step on fake CPU devices); "auto" follows the backend."""
    choices = {"cpu": True, "accelerator": False, "auto": None}
    if path not in choices:
        raise ValueError(f"kernel path {path!r}; choose one of: {', '.join(choices)}")
    token = _CPU_PATH.set(choices[path])
    try:
        yield
    finally:
        _CPU_PATH.reset(token)


def linear(x_BxLxI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """`x @ w` over the last axis. On CPU its weight gradient is a plain row-major matmul on an
    explicit copy of x^T: XLA's CPU backend otherwise contracts over the token axis with a slow
    transposed-operand kernel (the gain is measured in bench/RESULTS.md)."""
    if cpu_kernels():
        return _linear_cpu(x_BxLxI, w_IxO)
    return x_BxLxI @ w_IxO


@jax.custom_vjp
def _linear_cpu(x, w):
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def weight_grad(x_MxI: jax.Array, dy_MxO: jax.Array) -> jax.Array:
    """x^T @ dy in float32, the weight gradient of `x @ w`, contracted over the M tokens."""
    if cpu_kernels():
        # The barrier keeps XLA from folding the transpose back into the dot's dimension numbers.
        x_IxM = jax.lax.optimization_barrier(x_MxI.T)
        return jnp.dot(x_IxM, dy_MxO, preferred_element_type=jnp.float32)
    return jnp.einsum("mi,mo->io", x_MxI, dy_MxO, preferred_element_type=jnp.float32)


def _linear_bwd(res, dy):
    x, w = res
    dw = weight_grad(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
    return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


_linear_cpu.defvjp(_linear_fwd, _linear_bwd)


_NEG = float(np.finfo(np.float32).min)
Q_BLOCK = 128  # query rows per block of the causal path; keys past a block's last row are skipped


class CausalSegments(NamedTuple):
    """The training mask, kept implicit: query slot i sees key slot j iff j <= i and both carry
    the same segment id (0 = padding). Keys are the queries' own slots (no cache)."""
    segment_ids_BxL: jax.Array


def _to_groups(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE):
    """Heads to the front, [B, K, G, L, E]: XLA's CPU batched matmuls are much faster with the
    batch dims leading than with them interleaved between the contracted ones."""
    b, l, h, e = q_BxLxHxE.shape
    kh = k_BxSxKxE.shape[2]
    q_BxKxGxLxE = q_BxLxHxE.reshape(b, l, kh, h // kh, e).transpose(0, 2, 3, 1, 4)
    return q_BxKxGxLxE, k_BxSxKxE.transpose(0, 2, 1, 3), v_BxSxKxE.transpose(0, 2, 1, 3)


def _scores(q_BxKxGxLxE, k_BxKxSxE, ok_BxLxS):
    s = jnp.einsum("bkgle,bkse->bkgls", q_BxKxGxLxE, k_BxKxSxE,
                   preferred_element_type=jnp.float32) / math.sqrt(q_BxKxGxLxE.shape[-1])
    return jnp.where(ok_BxLxS[:, None, None], s, _NEG)


def _dense(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, mask_BxLxS):
    p = jax.nn.softmax(_scores(q_BxKxGxLxE, k_BxKxSxE, mask_BxLxS), axis=-1)
    return jnp.einsum("bkgls,bkse->bkgle", p.astype(v_BxKxSxE.dtype), v_BxKxSxE)


def _blocks(l: int):
    """(first row, end row) of each query block; block i attends to keys [0, end)."""
    return [(lo, min(lo + Q_BLOCK, l)) for lo in range(0, l, Q_BLOCK)]


def _block_mask(seg_BxL, lo: int, hi: int):
    slot = jnp.arange(hi)
    return ((seg_BxL[:, lo:hi, None] == seg_BxL[:, None, :hi])
            & (slot[None, None, :] <= slot[None, lo:hi, None]))


@jax.custom_vjp
def _causal(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, seg_BxL):
    return _causal_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, seg_BxL)[0]


def _causal_fwd(q, k, v, seg_BxL):
    outs, lses = [], []
    for lo, hi in _blocks(q.shape[3]):
        s = _scores(q[:, :, :, lo:hi], k[:, :, :hi], _block_mask(seg_BxL, lo, hi))
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        z = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgls,bkse->bkgle", p.astype(v.dtype), v[:, :, :hi],
                       preferred_element_type=jnp.float32) / z
        outs.append(o.astype(v.dtype))
        lses.append(m + jnp.log(z))
    o_BxKxGxLxE = jnp.concatenate(outs, axis=3)
    # Saved for the backward pass: inputs, output and the row log-sum-exp, not the L x S probs.
    return o_BxKxGxLxE, (q, k, v, seg_BxL, o_BxKxGxLxE, jnp.concatenate(lses, axis=3))


def _causal_bwd(res, do_BxKxGxLxE):
    q, k, v, seg_BxL, o, lse = res
    f32 = jnp.float32
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    delta = jnp.sum(do_BxKxGxLxE.astype(f32) * o.astype(f32), axis=-1, keepdims=True)
    for lo, hi in _blocks(q.shape[3]):
        q_b, do_b = q[:, :, :, lo:hi], do_BxKxGxLxE[:, :, :, lo:hi]
        s = _scores(q_b, k[:, :, :hi], _block_mask(seg_BxL, lo, hi))
        p = jnp.exp(s - lse[:, :, :, lo:hi])  # masked keys: exp(-inf) = 0
        dv = dv.at[:, :, :hi].add(jnp.einsum("bkgls,bkgle->bkse", p.astype(do_b.dtype), do_b,
                                             preferred_element_type=f32))
        dp = jnp.einsum("bkgle,bkse->bkgls", do_b, v[:, :, :hi], preferred_element_type=f32)
        ds = p * (dp - delta[:, :, :, lo:hi]) / math.sqrt(q.shape[-1])
        ds = ds.astype(q.dtype)
        dq.append(jnp.einsum("bkgls,bkse->bkgle", ds, k[:, :, :hi], preferred_element_type=f32))
        dk = dk.at[:, :, :hi].add(jnp.einsum("bkgls,bkgle->bkse", ds, q_b,
                                             preferred_element_type=f32))
    dq = jnp.concatenate(dq, axis=3)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_causal.defvjp(_causal_fwd, _causal_bwd)


def attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask) -> jax.Array:
    """Softmax attention with GQA. `mask` is a bool [B, L, S], True where a query may see a key,
    or CausalSegments (training: keys are the query slots, blocks past the diagonal skipped)."""
    b, l, h, e = q_BxLxHxE.shape
    q, k, v = _to_groups(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
    if isinstance(mask, CausalSegments):
        o_BxKxGxLxE = _causal(q, k, v, mask.segment_ids_BxL)
    else:
        o_BxKxGxLxE = _dense(q, k, v, mask)
    return o_BxKxGxLxE.transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)


# ---------------------------------------------------------------- the loss kernels

TOKENS_PER_CHUNK = 512  # rows of logits per chunk: the fastest on the CPU benchmarks (bench/)
MAX_CHUNKS = 16  # chunks are unrolled, so long global batches get fewer, larger chunks


@jax.custom_vjp
def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, float32 [B, L]."""
    return _nll_fwd(logits_BxLxV, targets_BxL)[0]


def _nll_fwd(logits_BxLxV, targets_BxL):
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    tgt_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - tgt_BxL, (logits_BxLxV, lse_BxL, targets_BxL)


def _softmax_minus_onehot(logits_BxLxV, lse_BxL, targets_BxL):
    # One fused pass; autodiff of take_along_axis would scatter into a zeroed [B, L, V] buffer
    # and add it to the logsumexp gradient in separate passes.
    v_iota = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, logits_BxLxV.ndim - 1)
    p = jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None])
    return p - (v_iota == targets_BxL[..., None])


def _nll_bwd(res, ct_BxL):
    logits_BxLxV, lse_BxL, targets_BxL = res
    g = _softmax_minus_onehot(logits_BxLxV, lse_BxL, targets_BxL) * ct_BxL[..., None]
    return g.astype(logits_BxLxV.dtype), None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def _chunks(m: int) -> list[tuple[int, int]]:
    size = max(1, TOKENS_PER_CHUNK, -(-m // MAX_CHUNKS))
    return [(lo, min(lo + size, m)) for lo in range(0, m, size)]


def _chunk_logits(h_CxD, w_VxD):
    return jnp.einsum("cd,vd->cv", h_CxD, w_VxD, preferred_element_type=jnp.float32)


def _loss_tokens_first(h_BxLxD, targets_BxL, mask_BxL):
    """The M = B*L tokens reordered so that those in the loss come first (stable), and how many
    there are: chunks past them are skipped, so a masked prompt costs no LM head work."""
    m_M = jnp.asarray(mask_BxL).reshape(-1).astype(jnp.float32)
    order_M = jnp.argsort(m_M == 0, stable=True)
    h_MxD = jnp.asarray(h_BxLxD).reshape(m_M.shape[0], -1)[order_M]
    t_M = jnp.asarray(targets_BxL).reshape(-1)[order_M]
    return order_M, h_MxD, t_M, m_M[order_M], jnp.sum(m_M != 0)


def _chunk_nll(h_CxD, w_VxD, t_C, m_C):
    """(masked nll sum, the nll residuals, live rows) of one chunk. Rows out of the loss are
    zeroed before the matmul, so whatever they hold (even NaN) reaches neither loss nor grads."""
    live_C = m_C != 0
    h_CxD = jnp.where(live_C[:, None], h_CxD, 0)
    nll_C, res = _nll_fwd(_chunk_logits(h_CxD, w_VxD), t_C)
    return jnp.sum(jnp.where(live_C, nll_C, 0) * m_C), res, h_CxD, live_C


@jax.custom_vjp
def head_loss_sum(h_BxLxD: jax.Array, w_VxD: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array) -> jax.Array:
    """sum over masked-in tokens of -log softmax(h @ w^T)[target], float32."""
    _, h_MxD, t_M, m_M, n_live = _loss_tokens_first(h_BxLxD, targets_BxL, mask_BxL)
    total = jnp.float32(0)
    for lo, hi in _chunks(t_M.shape[0]):
        live = functools.partial(_chunk_nll, h_MxD[lo:hi], w_VxD, t_M[lo:hi], m_M[lo:hi])
        # As in _head_fwd, the first chunk runs unconditionally.
        total = total + (live()[0] if lo == 0 else jax.lax.cond(
            lo < n_live, lambda live=live: live()[0], lambda: jnp.float32(0)))
    return total


def _chunk_grads(h_CxD, w_VxD, t_C, m_C, dw_DxV):
    """One chunk's loss, its h gradient, and dw_DxV plus its w gradient (transposed)."""
    total, (logits, lse, _), h_CxD, live_C = _chunk_nll(h_CxD, w_VxD, t_C, m_C)
    # Rows out of the loss have finite logits (their h is zeroed), so the mask zeroes them.
    g_CxV = (_softmax_minus_onehot(logits, lse, t_C) * m_C[:, None]).astype(h_CxD.dtype)
    dh_CxD = jnp.dot(g_CxV, w_VxD, preferred_element_type=jnp.float32).astype(h_CxD.dtype)
    return total, dh_CxD, dw_DxV + weight_grad(h_CxD, g_CxV)


def _head_fwd(h_BxLxD, w_VxD, targets_BxL, mask_BxL):
    """The loss and, chunk by chunk, its gradients: the backward pass only scales them."""
    b, l, d = h_BxLxD.shape
    order_M, h_MxD, t_M, m_M, n_live = _loss_tokens_first(h_BxLxD, targets_BxL, mask_BxL)
    total, dh = jnp.float32(0), []
    dw_DxV = jnp.zeros((d, w_VxD.shape[0]), jnp.float32)  # accumulated transposed: see weight_grad
    for lo, hi in _chunks(t_M.shape[0]):
        def skip(dw_DxV, n=hi - lo):
            return jnp.float32(0), jnp.zeros((n, d), h_BxLxD.dtype), dw_DxV
        live = functools.partial(_chunk_grads, h_MxD[lo:hi], w_VxD, t_M[lo:hi], m_M[lo:hi])
        # The first chunk runs unconditionally: a batch with any loss at all needs it.
        s, dh_CxD, dw_DxV = live(dw_DxV) if lo == 0 else jax.lax.cond(lo < n_live, live, skip,
                                                                        dw_DxV)
        total, dh = total + s, dh + [dh_CxD]
    dh_MxD = jnp.concatenate(dh)
    dh_BxLxD = jnp.zeros_like(dh_MxD).at[order_M].set(dh_MxD).reshape(b, l, d)
    return total, (dh_BxLxD, dw_DxV.T.astype(w_VxD.dtype))


def _head_bwd(res, ct):
    dh_BxLxD, dw_VxD = res
    return (ct * dh_BxLxD).astype(dh_BxLxD.dtype), (ct * dw_VxD).astype(dw_VxD.dtype), None, None


head_loss_sum.defvjp(_head_fwd, _head_bwd)
