"""The jitted decoder behind `jaxft.generate`: a fixed set of rows, each decoding one prompt at
a time, refilled with the next prompts as their answers finish (continuous batching), so short
answers do not wait for the longest one of a batch.

Every row's cache has one layout: its prompt (what follows the shared prefix) left-padded into
slots [0, P), its i-th new token at slot P + i. Per row the decoder keeps the next position,
the count of tokens generated, whether it is done, and the logits of its next token.

The host loop fills rows G at a time (one prefill of G rows, G dividing the row count), then
decodes until at least G more rows are done, collects them and refills them. The decode loop
compiles once; a fill compiles per prompt width (multiples of 16). Each row's arithmetic is
that of its prompt decoded alone, whichever rows run beside it.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxft import kvcache, sharding
from jaxft.kvcache import Static


def sample_logits(key, logits_BxV: jax.Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next token per row: argmax when temperature is 0, else a draw from the tempered
    distribution cut to the top_k most likely tokens (0: all) and then to the smallest set
    whose probability reaches top_p. The three settings are Python values (static under jit)."""
    if temperature <= 0.0:
        return greedy(logits_BxV)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0 or top_p < 1.0:
        v = logits_BxV.shape[-1]
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
        keep_BxV = jnp.broadcast_to(jnp.arange(v) < (top_k if top_k > 0 else v), sorted_BxV.shape)
        sorted_BxV = jnp.where(keep_BxV, sorted_BxV, neg)
        if top_p < 1.0:
            p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
            # Keep a token while the mass before it is still short of top_p: the first token
            # always stays, and so does the one that crosses the threshold.
            before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV
            keep_BxV = keep_BxV & (before_BxV < top_p)
        n_keep_B = jnp.sum(keep_BxV, axis=-1)
        cutoff_B = jnp.take_along_axis(sorted_BxV, (n_keep_B - 1)[:, None], axis=-1)
        logits_BxV = jnp.where(logits_BxV >= cutoff_B, logits_BxV, neg)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def greedy(logits_BxV: jax.Array) -> jax.Array:
    """`argmax` over the last axis (the first of tied maxima; a NaN wins, as in jnp.argmax) as a
    max and a min-index pass: XLA's CPU argmax, one fused (value, index) reduction, takes 4x as
    long over a 49k vocab."""
    v = logits_BxV.shape[-1]
    i_V = jnp.arange(v, dtype=jnp.int32)
    max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
    # A NaN's index is shifted below every other, so the minimum picks the first NaN if any.
    key_BxV = jnp.where(jnp.isnan(logits_BxV), i_V - v, jnp.where(logits_BxV == max_Bx1, i_V, v))
    first_B = jnp.min(key_BxV, axis=-1)
    return jnp.where(first_B < 0, first_B + v, first_B)


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int):
    """ids, positions and segment ids `[rows, length]`, each prompt right-aligned; rows past
    len(prompts) are filler that repeat the first prompt's first token."""
    ids = np.zeros((rows, length), np.int32)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        p = prompts[r] if r < len(prompts) else prompts[0][:1]
        n = len(p)
        ids[r, length - n:] = p
        seg[r, length - n:] = 1
        pos[r, length - n:] = np.arange(n)
    return ids, pos, seg


class Rows(NamedTuple):
    """The decoder's state, carried on the device from call to call."""
    cache: kvcache.RowCache  # k, v: N arrays [B, K, S, E]; ok [B, S]
    logits_BxV: jax.Array    # the next token's logits
    pos_B: jax.Array         # the next token's position
    gen_B: jax.Array         # tokens generated so far
    done_B: jax.Array        # stopped, or free
    out_BxT: jax.Array       # tokens generated, -1 past the end
    ids_BxS: jax.Array       # the token in each cache slot, -1 where none (drafts look here)
    step: jax.Array          # decode passes run since the first fill (the sampling key's index)


def group_size(rows: int, prompts: int) -> int:
    """Rows filled at once: all of them when every prompt fits, else the largest divisor of
    the row count up to a quarter of it (a refill waits for that many rows to finish)."""
    if prompts <= rows:
        return rows
    return max(g for g in range(1, -(-rows // 4) + 1) if rows % g == 0)


def empty_rows(model, b: int, s: int, t: int, mesh) -> Rows:
    """Every row free: a zero cache of S slots and room for T new tokens."""
    cfg = model.cfg
    shape = (b, cfg.n_kv_heads, s, cfg.head_size)
    kv = None
    if mesh is not None:  # cache rows follow the batch; kv heads follow the tensor axis
        axes = ("batch", "kv_heads", "length", "head_dim")
        kv = NamedSharding(mesh, sharding.spec(axes, shape, mesh))
    # Distinct buffers throughout: the state is donated to each call.
    k, v = (tuple(jax.device_put(jnp.zeros(shape, jnp.dtype(cfg.dtype)), kv)
                  for _ in range(cfg.n_layers)) for _ in range(2))
    return Rows(kvcache.RowCache(k, v, jnp.zeros((b, s), bool)),
                jnp.zeros((b, cfg.vocab_size), jnp.float32), jnp.zeros((b,), jnp.int32),
                jnp.zeros((b,), jnp.int32),
                jnp.ones((b,), bool), jnp.full((b, t), -1, jnp.int32), jnp.full((b, s), -1, jnp.int32),
                jnp.int32(0))


@partial(jax.jit, static_argnames=("graphdef", "p"), donate_argnames=("rows",))
def _fill(graphdef, state, prefix_k, prefix_v, rows: Rows, at_G, ids_GxL, valid_GxL, live_G, *,
          p: int) -> Rows:
    """Prefill G prompts (left-padded to L <= p) into rows `at_G`, right-aligned in their
    first p slots; rows not `live_G` stay free. Compiled per L: short prompts prefill short."""
    model = nnx.merge(graphdef.graphdef, state)
    prefix = kvcache.Prefix((), prefix_k, prefix_v)
    lo = p - ids_GxL.shape[1]
    pos_GxL = prefix_k.shape[2] + jnp.maximum(jnp.cumsum(valid_GxL, axis=1) - 1, 0)
    h_GxLxD, k_new, v_new = kvcache.forward(model, ids_GxL, pos_GxL, kvcache.causal_ok(valid_GxL),
                                            prefix)
    c = rows.cache
    ok_GxS = jnp.zeros((len(live_G), c.ok_BxS.shape[1]), bool).at[:, lo:p].set(valid_GxL)
    k, v = (tuple(x.at[at_G, :, lo:p].set(new[i].astype(x.dtype)) for i, x in enumerate(xs))
            for xs, new in ((c.k, k_new), (c.v, v_new)))
    cache = kvcache.RowCache(k, v, c.ok_BxS.at[at_G].set(ok_GxS))
    ids_GxS = jnp.full(ok_GxS.shape, -1, jnp.int32).at[:, lo:p].set(jnp.where(valid_GxL, ids_GxL, -1))
    # Only the last position's logits are needed, never the full [G, L, V].
    return rows._replace(
        cache=cache, logits_BxV=rows.logits_BxV.at[at_G].set(model.logits(h_GxLxD[:, -1:])[:, 0]),
        pos_B=rows.pos_B.at[at_G].set(pos_GxL[:, -1] + 1), gen_B=rows.gen_B.at[at_G].set(0),
        done_B=rows.done_B.at[at_G].set(~live_G), out_BxT=rows.out_BxT.at[at_G].set(-1),
        ids_BxS=rows.ids_BxS.at[at_G].set(ids_GxS))


def _step(model, layers, prefix: kvcache.Prefix, rows: Rows, p: int, stop_T, key, max_new,
          sampling):
    """One token for every row still going; a done row's slot writes are dropped."""
    b = rows.done_B.shape[0]
    tok_B = sample_logits(jax.random.fold_in(key, rows.step), rows.logits_BxV, *sampling)
    tok_B = jnp.where(rows.done_B, -1, tok_B)  # -1 marks "already finished"
    b_B, gen_B = jnp.arange(b), rows.gen_B
    t_B = jnp.where(rows.done_B, rows.out_BxT.shape[1], gen_B)  # out of range: dropped
    out_BxT = rows.out_BxT.at[b_B, t_B].set(tok_B, mode="drop")
    h_Bx1xD, k1, v1 = kvcache.forward(model, jnp.maximum(tok_B, 0)[:, None], rows.pos_B[:, None],
                                      jnp.ones((b, 1, 1), bool), prefix, rows.cache, layers)
    c = rows.cache
    slot_B = jnp.where(rows.done_B, c.ok_BxS.shape[1], p + gen_B)
    # Advanced indices on axes 0 and 2: each layer's update is laid out [B, K, E].
    k, v = (tuple(x.at[b_B, :, slot_B].set(new[i, :, :, 0].astype(x.dtype), mode="drop")
                  for i, x in enumerate(xs)) for xs, new in ((c.k, k1), (c.v, v1)))
    cache = kvcache.RowCache(k, v, c.ok_BxS.at[b_B, slot_B].set(True, mode="drop"))
    gen_B = gen_B + ~rows.done_B
    done_B = rows.done_B | jnp.isin(tok_B, stop_T) | (gen_B >= max_new)
    return Rows(cache, model.logits(h_Bx1xD)[:, 0], rows.pos_B + 1, gen_B, done_B, out_BxT,
                rows.ids_BxS.at[b_B, slot_B].set(tok_B, mode="drop"), rows.step + 1)


def lookup(ids_BxS, cur_B, tok_B, k: int) -> jax.Array:
    """Draft tokens `[B, k]` by prompt lookup: what followed an earlier occurrence of the row's
    last two tokens (the one in slot cur - 1, then `tok_B`, which goes into slot cur), else of
    `tok_B` alone, copied from the row's slots with `tok_B` in slot cur; -1 where nothing
    matches or the copy runs out. Among the matches of the longer n-gram, the latest with k
    tokens after it, else the earliest (the longest copy): in a run of one token the latest
    match has a single token after it, the earliest a full draft."""
    b, s = ids_BxS.shape
    b_B, i_S = jnp.arange(b), jnp.arange(s)
    src_BxS = ids_BxS.at[b_B, cur_B].set(tok_B, mode="drop")
    last_B = ids_BxS[b_B, jnp.maximum(cur_B - 1, 0)]
    before_BxS = jnp.concatenate([jnp.full((b, 1), -1, ids_BxS.dtype), ids_BxS[:, :-1]], axis=1)
    one_BxS = (ids_BxS == tok_B[:, None]) & (i_S < cur_B[:, None]) & (tok_B[:, None] >= 0)
    two_BxS = one_BxS & (before_BxS == last_B[:, None]) & (last_B[:, None] >= 0)
    full_BxS = i_S + k <= cur_B[:, None]
    rank_BxS = jnp.where(one_BxS, 1 + 2 * two_BxS + full_BxS, 0)  # full copies rank even
    best_B = jnp.max(rank_BxS, axis=1)
    top_BxS = rank_BxS == best_B[:, None]
    at_B = jnp.where(best_B % 2 == 0, jnp.max(jnp.where(top_BxS, i_S, -1), axis=1),
                     jnp.min(jnp.where(top_BxS, i_S, s), axis=1))
    src_BxK = at_B[:, None] + 1 + jnp.arange(k)
    ok_BxK = (best_B[:, None] > 0) & (src_BxK <= cur_B[:, None])
    return jnp.where(ok_BxK, jnp.take_along_axis(src_BxS, jnp.minimum(src_BxK, s - 1), 1), -1)


def _ahead(model, layers, prefix: kvcache.Prefix, rows: Rows, in_BxJ, n: int):
    """Logits `[B, J, V]` and keys/values `[N, B, K, J, E]` of the first n of this pass's J
    tokens, zero past them. The cache is only read here: its writes stay in place."""
    b, j = in_BxJ.shape
    h_BxnxD, k1, v1 = kvcache.forward(model, jnp.maximum(in_BxJ[:, :n], 0),
                                      rows.pos_B[:, None] + jnp.arange(n),
                                      kvcache.causal_ok(jnp.ones((b, n), bool)), prefix,
                                      rows.cache, layers)
    pad = lambda x, axis: jnp.pad(x, [(0, j - n if a == axis else 0) for a in range(x.ndim)])
    return pad(model.logits(h_BxnxD), 1), pad(k1, 3), pad(v1, 3)


def _draft_step(model, layers, prefix: kvcache.Prefix, rows: Rows, p: int, stop_T, max_new,
                tok_B, draft_BxK):
    """Greedy only: the next token and its drafts go through the model in one pass (one token
    alone when no row has a draft); each row keeps the drafts the model's own greedy picks
    agree with, so the tokens are those of one token a pass, cut at a stop and at max_new."""
    b, nd = draft_BxK.shape
    c, j_J = rows.cache, jnp.arange(nd + 1)
    in_BxJ = jnp.concatenate([tok_B[:, None], draft_BxK], axis=1)
    logits_BxJxV, k1, v1 = jax.lax.cond(
        jnp.any(draft_BxK[:, 0] >= 0),
        lambda: _ahead(model, layers, prefix, rows, in_BxJ, nd + 1),
        lambda: _ahead(model, layers, prefix, rows, in_BxJ, 1))
    agree_BxK = draft_BxK == greedy(logits_BxJxV[:, :-1])
    took_B = jnp.sum(jnp.cumprod(agree_BxK, axis=1), axis=1)  # drafts kept
    stop_B = jnp.min(jnp.where(jnp.isin(in_BxJ, stop_T), j_J, nd + 1), axis=1)
    n_B = jnp.minimum(jnp.minimum(took_B, stop_B) + 1, max_new - rows.gen_B)
    n_B = jnp.where(rows.done_B, 0, n_B)  # tokens this pass emits
    keep_BxJ = j_J < n_B[:, None]
    b_Bx1 = jnp.arange(b)[:, None]
    t_BxJ = jnp.where(keep_BxJ, rows.gen_B[:, None] + j_J, rows.out_BxT.shape[1])
    slot_BxJ = jnp.where(keep_BxJ, p + rows.gen_B[:, None] + j_J, c.ok_BxS.shape[1])
    # Advanced indices on axes 0 and 2: each layer's update is laid out [B, J, K, E].
    k, v = (tuple(x.at[b_Bx1, :, slot_BxJ].set(new[i].transpose(0, 2, 1, 3).astype(x.dtype),
                                                mode="drop") for i, x in enumerate(xs))
            for xs, new in ((c.k, k1), (c.v, v1)))
    cache = kvcache.RowCache(k, v, c.ok_BxS.at[b_Bx1, slot_BxJ].set(True, mode="drop"))
    gen_B = rows.gen_B + n_B
    done_B = rows.done_B | (stop_B < n_B) | (gen_B >= max_new)
    logits_BxV = logits_BxJxV[jnp.arange(b), took_B]
    return Rows(cache, logits_BxV, rows.pos_B + n_B, gen_B, done_B,
                rows.out_BxT.at[b_Bx1, t_BxJ].set(in_BxJ, mode="drop"),
                rows.ids_BxS.at[b_Bx1, slot_BxJ].set(in_BxJ, mode="drop"), rows.step + 1)


def _any_step(model, layers, prefix, rows: Rows, p, stop_T, key, max_new, sampling, draft: int):
    """One pass: a token a row, or with `draft` > 0 (greedy only) up to 1 + draft."""
    if draft == 0:
        return _step(model, layers, prefix, rows, p, stop_T, key, max_new, sampling)
    tok_B = jnp.where(rows.done_B, -1, greedy(rows.logits_BxV))
    draft_BxK = lookup(rows.ids_BxS, p + rows.gen_B, tok_B, draft)
    return _draft_step(model, layers, prefix, rows, p, stop_T, max_new, tok_B, draft_BxK)


# XLA:CPU's default copy insertion copies the loop-carried cache twice per step (it cannot
# tell that attention's reads come before the slot writes); its region analysis can, and the
# writes then happen in place (measured in bench/RESULTS.md). Other backends ignore the flag.
@partial(jax.jit, static_argnames=("graphdef", "p", "sampling", "draft"), donate_argnames=("rows",),
         compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True})
def _decode(graphdef, state, prefix_k, prefix_v, rows: Rows, stop_T, key, max_new, want, layers,
            *, p: int, sampling, draft: int = 0):
    """Decode until at least `want` rows are done, or all are. `layers`: the layer weights as
    `kvcache.layer_views` gives them, or None to slice them from the model's stacked weights.
    `draft`: prompt-lookup draft tokens a pass (0: none)."""
    model = nnx.merge(graphdef.graphdef, state)
    prefix = kvcache.Prefix((), prefix_k, prefix_v)

    def cond(r: Rows):
        return (jnp.sum(r.done_B) < want) & ~jnp.all(r.done_B)

    return jax.lax.while_loop(
        cond, lambda r: _any_step(model, layers, prefix, r, p, stop_T, key, max_new, sampling,
                                  draft), rows)


def decode(model, own: list[list[int]], prefix: kvcache.Prefix, *, rows: int, p: int, t: int,
           stop_T: np.ndarray, key, max_new: int, sampling: tuple, mesh,
           draft: int = 0) -> list[np.ndarray]:
    """The new tokens `[t]` (-1 past the end) of each prompt in `own` (the tokens after the
    prefix, each at most p long), decoded `rows` at a time, with `draft` prompt-lookup drafts
    a pass when greedy."""
    g = group_size(rows, len(own))
    state_rows = empty_rows(model, rows, p + t, t, mesh)
    graphdef, state = nnx.split(model)
    common = (Static(graphdef), state, prefix.k_NxKxPxE, prefix.v_NxKxPxE)
    layers = kvcache.layer_views(model)  # the fills' big matmuls do not need them
    queue, owner, free = deque(range(len(own))), [-1] * rows, list(range(rows))
    results: list[np.ndarray | None] = [None] * len(own)
    while True:
        while queue and len(free) >= g:
            at, take = free[:g], [queue.popleft() for _ in range(min(g, len(queue)))]
            free = free[g:] + at[len(take):]  # filler rows of a last, short group stay free
            for r, i in zip(at, take):
                owner[r] = i
            # Prompt slots padded to a multiple of 16: a few compiles, little wasted prefill.
            width = min(p, -(-max(len(own[i]) for i in take) // 16) * 16)
            ids, _, seg = left_pad([own[i] for i in take], g, width)
            state_rows = _fill(*common, state_rows, np.asarray(at, np.int32), ids,
                               seg.astype(bool), np.arange(g) < len(take), p=p)
        want = min(rows, len(free) + g) if queue else rows  # g more rows free, or all
        state_rows = _decode(*common, state_rows, jnp.asarray(stop_T), key, jnp.int32(max_new),
                             jnp.int32(want), layers, p=p, sampling=sampling,
                             draft=draft if sampling[0] <= 0.0 else 0)
        done, out = jax.device_get((state_rows.done_B, state_rows.out_BxT))
        for r in range(rows):
            if owner[r] >= 0 and done[r]:
                results[owner[r]], owner[r] = out[r], -1
                free.append(r)
        if not queue and all(o < 0 for o in owner):
            return results
