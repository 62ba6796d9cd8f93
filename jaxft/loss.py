"""Masked next-token cross-entropy. Sums, not means: the trainer divides by the token count of
the whole global batch (all microbatches), so every target token weighs the same.

On the CPU, training goes through `head_loss_sum`, which fuses the LM head with the loss: the
`[B, L, V]` logits exist only one chunk of tokens at a time, and each chunk's gradients are
computed while its logits are hot, so neither the logits nor their gradient is ever kept whole.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.model import cpu_kernels, weight_grad

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


def xent_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array):
    """Returns (sum of -log p(target) over masked-in tokens, number of those tokens)."""
    m = mask_BxL.astype(jnp.float32)
    return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * m), jnp.sum(m)


def _chunks(b: int, l: int) -> list[tuple[int, int]]:
    size = max(1, TOKENS_PER_CHUNK // b, -(-l // MAX_CHUNKS))
    return [(lo, min(lo + size, l)) for lo in range(0, l, size)]


def _chunk_logits(h_BxCxD, w_VxD):
    return jnp.einsum("bcd,vd->bcv", h_BxCxD, w_VxD, preferred_element_type=jnp.float32)


@jax.custom_vjp
def head_loss_sum(h_BxLxD: jax.Array, w_VxD: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array) -> jax.Array:
    """sum over masked-in tokens of -log softmax(h @ w^T)[target], float32."""
    b, l, _ = h_BxLxD.shape
    m = mask_BxL.astype(jnp.float32)
    total = jnp.float32(0)
    for lo, hi in _chunks(b, l):
        nll = token_nll(_chunk_logits(h_BxLxD[:, lo:hi], w_VxD), targets_BxL[:, lo:hi])
        total = total + jnp.sum(nll * m[:, lo:hi])
    return total


def _head_fwd(h_BxLxD, w_VxD, targets_BxL, mask_BxL):
    """The loss and, chunk by chunk, its gradients: the backward pass only scales them."""
    b, l, d = h_BxLxD.shape
    m = mask_BxL.astype(jnp.float32)
    total, dh = jnp.float32(0), []
    dw_DxV = jnp.zeros((d, w_VxD.shape[0]), jnp.float32)  # accumulated transposed: see weight_grad
    for lo, hi in _chunks(b, l):
        h_c, t_c, m_c = h_BxLxD[:, lo:hi], targets_BxL[:, lo:hi], m[:, lo:hi]
        nll, (logits, lse, _) = _nll_fwd(_chunk_logits(h_c, w_VxD), t_c)
        total = total + jnp.sum(nll * m_c)
        g = (_softmax_minus_onehot(logits, lse, t_c) * m_c[..., None]).astype(h_BxLxD.dtype)
        dh.append(jnp.einsum("bcv,vd->bcd", g, w_VxD,
                             preferred_element_type=jnp.float32).astype(h_BxLxD.dtype))
        dw_DxV = dw_DxV + weight_grad(h_c.reshape(-1, d), g.reshape(-1, g.shape[-1]))
    return total, (jnp.concatenate(dh, axis=1), dw_DxV.T.astype(w_VxD.dtype))


def _head_bwd(res, ct):
    dh_BxLxD, dw_VxD = res
    return (ct * dh_BxLxD).astype(dh_BxLxD.dtype), (ct * dw_VxD).astype(dw_VxD.dtype), None, None


head_loss_sum.defvjp(_head_fwd, _head_bwd)


def batch_loss_sum(model, batch: dict):
    """(loss sum, target tokens) of the model on one batch from `jaxft.data`."""
    h_BxLxD, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    if not cpu_kernels():
        # Accelerators: the plain logits path, whose sharded memory `jaxft plan` has measured.
        # The fused head's per-chunk matmuls still need their own sharding work under fsdp
        # (20.9 vs 10.3 GiB of temporaries for 7B on fsdp=8 in the plan).
        return xent_sum(model.logits(h_BxLxD), batch["targets"], batch["loss_mask"])
    total = head_loss_sum(model.head_input(h_BxLxD), model.head_VxD(), batch["targets"],
                          batch["loss_mask"])
    return total, jnp.sum(batch["loss_mask"].astype(jnp.float32))
