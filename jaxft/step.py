"""The pure train and eval steps, jitted once with in/out shardings and donation, the
host-to-global batch transfer, and the FLOP count behind the MFU estimate."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxft import distributed, sharding, state
from jaxft.loss import batch_loss_sum
from jaxft.model import param_count

# Peak dense FLOP/s per device, for the MFU estimate ($JAXFT_PEAK_FLOPS overrides).
PEAK_FLOPS = {"cpu": 175e9,  # measured fp32 matmul peak of the 2-core dev machine
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v4": 275e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_step(graphdef, tx, grad_accum: int, mesh, params, opt_state, batch):
    """One optimizer step. The loss is the masked mean over every target token of the global
    batch (all microbatches together), not a mean of per-example means."""
    with sharding.activation_mesh(mesh):
        return _train_step(graphdef, tx, grad_accum, params, opt_state, batch)


def _train_step(graphdef, tx, grad_accum: int, params, opt_state, batch):
    grad_fn = jax.value_and_grad(
        lambda p, mb: batch_loss_sum(nnx.merge(graphdef, p), mb), has_aux=True)
    if grad_accum == 1:
        (loss_sum, n_tok), grads = grad_fn(params, batch)
    else:
        # Rows are split [B] -> [B/k, k] so each device's microbatch slice stays local.
        mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum,
                                               *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, mb):
            (l, n), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (l, n, g)), None

        zero = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, n_tok, grads), _ = jax.lax.scan(body, zero, mbs)
    n = jnp.maximum(n_tok, 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss_sum / n, "tokens": n_tok,
                               "grad_norm": optax.tree.norm(grads)}


def compile_train_step(layout: state.Layout, grad_accum: int):
    batch_sh = sharding.batch_sharding(layout.mesh)
    step = lambda p, o, b: train_step(layout.graphdef, layout.tx, grad_accum, layout.mesh,  # noqa: E731
                                      p, o, b)
    return jax.jit(step, in_shardings=(layout.params_sh, layout.opt_sh, batch_sh),
                   out_shardings=(layout.params_sh, layout.opt_sh, None), donate_argnums=(0, 1))


def compile_eval_step(layout: state.Layout):
    batch_sh = sharding.batch_sharding(layout.mesh)
    def eval_step(p, b):
        with sharding.activation_mesh(layout.mesh):
            return batch_loss_sum(nnx.merge(layout.graphdef, p), b)

    return jax.jit(eval_step, in_shardings=(layout.params_sh, batch_sh))


def to_global(batch: dict, mesh) -> dict:
    """Each process's rows become one global array sharded over the data axes. Rows padded to
    each process's own longest (`padding: longest`) are first padded to the widest of them: zeros
    are padding, segment 0 with no loss, so the extra columns change nothing."""
    width = distributed.max_over_processes(max(v.shape[1] for v in batch.values()))
    batch = {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) if v.shape[1] < width else v
             for k, v in batch.items()}
    sh = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul param plus attention scores (PaLM appendix B)."""
    n = param_count(cfg) - cfg.vocab_size * cfg.dim * (1 if not cfg.tie_embeddings else 0)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


def peak_flops() -> float | None:
    """Peak FLOP/s of one device: $JAXFT_PEAK_FLOPS, else the table's entry for the device
    kind (or platform), else None: an unknown device gets no MFU rather than a wrong one."""
    if os.environ.get("JAXFT_PEAK_FLOPS"):
        return float(os.environ["JAXFT_PEAK_FLOPS"])
    dev = jax.devices()[0]
    for name, v in PEAK_FLOPS.items():
        if name.lower() in dev.device_kind.lower() or dev.platform == name:
            return v
    return None


def eval_loss(eval_step, params, loader, mesh, max_batches: int) -> float:
    total = count = 0.0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        s, n = eval_step(params, to_global(batch, mesh))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)
