"""The Optax chain: global-norm clipping, AdamW with a warmup + decay schedule and a weight-decay
mask. Gradient accumulation is done in the train step (see `jaxft.train`), not here."""
from __future__ import annotations

import jax
import optax

from jaxft.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to `lr * min_lr_ratio`."""
    warm = max(0, min(cfg.warmup_steps, total_steps - 1))
    rest = max(1, total_steps - warm)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, end, rest)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def _decay_mask(cfg: OptimConfig):
    """True where weight decay applies: not on norms and embeddings unless asked to."""
    def mask(params):
        def one(path, _):
            name = jax.tree_util.keystr(path)
            skip = "norm" in name or "embed_VxD" in name
            return cfg.decay_norms_and_embeddings or not skip
        return jax.tree_util.tree_map_with_path(one, params)
    return mask


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask(cfg)))
    return optax.chain(*parts)
