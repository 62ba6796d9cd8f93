"""Masked next-token cross-entropy. Sums, not means: the trainer divides by the token count of
the whole global batch (all microbatches), so every target token weighs the same."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def xent_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array):
    """Returns (sum of -log p(target) over masked-in tokens, number of those tokens)."""
    logits = logits_BxLxV.astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits, axis=-1)
    tgt_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    m = mask_BxL.astype(jnp.float32)
    return jnp.sum((lse_BxL - tgt_BxL) * m), jnp.sum(m)


def batch_loss_sum(model, batch: dict):
    """(loss sum, target tokens) of the model on one batch from `jaxft.data`."""
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return xent_sum(logits, batch["targets"], batch["loss_mask"])
