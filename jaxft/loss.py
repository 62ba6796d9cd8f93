"""Masked next-token cross-entropy. Sums, not means: the trainer divides by the token count of
the whole global batch (all microbatches), so every target token weighs the same."""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, float32 [B, L]."""
    return _nll_fwd(logits_BxLxV, targets_BxL)[0]


def _nll_fwd(logits_BxLxV, targets_BxL):
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    tgt_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - tgt_BxL, (logits_BxLxV, lse_BxL, targets_BxL)


def _nll_bwd(res, ct_BxL):
    # softmax - onehot in one fused pass; autodiff of take_along_axis would scatter into a
    # zeroed [B, L, V] buffer and add it to the logsumexp gradient in separate passes.
    logits_BxLxV, lse_BxL, targets_BxL = res
    v_iota = jax.lax.broadcasted_iota(jnp.int32, logits_BxLxV.shape, 2)
    p = jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None])
    g = (p - (v_iota == targets_BxL[..., None])) * ct_BxL[..., None]
    return g.astype(logits_BxLxV.dtype), None


token_nll.defvjp(_nll_fwd, _nll_bwd)


def xent_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array):
    """Returns (sum of -log p(target) over masked-in tokens, number of those tokens)."""
    m = mask_BxL.astype(jnp.float32)
    return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * m), jnp.sum(m)


def batch_loss_sum(model, batch: dict):
    """(loss sum, target tokens) of the model on one batch from `jaxft.data`."""
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return xent_sum(logits, batch["targets"], batch["loss_mask"])
