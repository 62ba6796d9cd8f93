"""Masked next-token cross-entropy. Sums, not means: the trainer divides by the token count of
the whole global batch (all microbatches), so every target token weighs the same.

On the CPU, training goes through `kernels.head_loss_sum`, which fuses the LM head with the
loss: the `[B, L, V]` logits exist only one chunk of tokens at a time, and each chunk's gradients
are computed while its logits are hot, so neither the logits nor their gradient is kept whole.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.kernels import cpu_kernels, head_loss_sum, token_nll


def xent_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array, mask_BxL: jax.Array):
    """Returns (sum of -log p(target) over masked-in tokens, number of those tokens)."""
    m = mask_BxL.astype(jnp.float32)
    return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * m), jnp.sum(m)


def batch_loss_sum(model, batch: dict):
    """(loss sum, target tokens) of the model on one batch from `jaxft.data`."""
    h_BxLxD, _ = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    if not cpu_kernels():
        # Accelerators: the plain logits path, whose sharded memory `jaxft plan` has measured.
        # The fused head's per-chunk matmuls still need their own sharding work under fsdp
        # (twice the temporaries in the plan; bench/RESULTS.md).
        return xent_sum(model.logits(h_BxLxD), batch["targets"], batch["loss_mask"])
    total = head_loss_sum(model.head_input(h_BxLxD), model.head_VxD(), batch["targets"],
                          batch["loss_mask"])
    return total, jnp.sum(batch["loss_mask"].astype(jnp.float32))
