"""The fast training paths against plain reference code: block-causal attention with its own
VJP (several query blocks, a ragged last one, packed segments, padding, GQA), the
cross-entropy whose backward skips the scatter, the chunked head+loss and `linear`'s VJP."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import kernels
from jaxft.kernels import token_nll
from jaxft.loss import xent_sum

B, H, K, E = 2, 4, 2, 8
L = 2 * kernels.Q_BLOCK + 37  # three query blocks, the last one short


def reference_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, ok_BxLxS):
    """Textbook softmax attention, each query head reading its kv head h // (H // K)."""
    g = q_BxLxHxE.shape[2] // k_BxSxKxE.shape[2]
    k = jnp.repeat(k_BxSxKxE, g, axis=2)
    v = jnp.repeat(v_BxSxKxE, g, axis=2)
    s = jnp.einsum("blhe,bshe->bhls", q_BxLxHxE, k) / math.sqrt(q_BxLxHxE.shape[-1])
    s = jnp.where(ok_BxLxS[:, None], s, -jnp.inf)
    return jnp.einsum("bhls,bshe->blhe", jax.nn.softmax(s, axis=-1), v)


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    q, k, v, w = (jnp.asarray(r.standard_normal(s), jnp.float32)
                  for s in ((B, L, H, E), (B, L, K, E), (B, L, K, E), (B, L, H, E)))
    seg = np.zeros((B, L), np.int32)
    seg[0, :100], seg[0, 100:250] = 1, 2  # two packed examples crossing a block edge, then padding
    seg[1, : L - 20] = 1  # one long example, padded at the end
    seg = jnp.asarray(seg)
    slot = np.arange(L)
    ok = (seg[:, :, None] == seg[:, None, :]) & (slot[None, None, :] <= slot[None, :, None])
    return q, k, v, w, seg, ok


def _value_and_grads(attn, mask, q, k, v, w):
    f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attn(q, k, v, mask) * w), argnums=(0, 1, 2)))
    return f(q, k, v)


@pytest.mark.parametrize("path", ["causal-blocks", "dense-mask"])
def test_attention_and_its_gradients_match_reference(inputs, path):
    q, k, v, w, seg, ok = inputs
    mask = kernels.CausalSegments(seg) if path == "causal-blocks" else ok
    want_out = reference_attention(q, k, v, ok)
    got_out = jax.jit(kernels.attention)(q, k, v, mask)
    np.testing.assert_allclose(got_out, want_out, atol=2e-5, rtol=0)
    (_, want), (_, got) = (_value_and_grads(reference_attention, ok, q, k, v, w),
                           _value_and_grads(kernels.attention, mask, q, k, v, w))
    for name, g, h in zip("qkv", got, want):
        assert np.abs(np.asarray(h)).max() > 0.1, name
        np.testing.assert_allclose(g, h, atol=5e-5, rtol=0, err_msg=f"d{name}")


def test_causal_blocks_keep_examples_apart(inputs):
    """A key of example 2 gets no gradient from example 1's queries, nor from later padding."""
    q, k, v, _, seg, _ = inputs
    w = jnp.zeros((B, L, H, E)).at[0, :100].set(1.0)  # loss on example 1's outputs only
    _, (dq, dk, dv) = _value_and_grads(kernels.attention, kernels.CausalSegments(seg), q, k, v, w)
    assert np.abs(np.asarray(dk[0, :100])).max() > 0 and np.abs(np.asarray(dv[0, :100])).max() > 0
    assert not np.asarray(dk[0, 100:]).any() and not np.asarray(dv[0, 100:]).any()
    assert not np.asarray(dq[0, 100:]).any()


def test_cross_entropy_gradient_matches_log_softmax():
    r = np.random.default_rng(1)
    logits = jnp.asarray(3 * r.standard_normal((3, 9, 40)), jnp.float32)
    tgt = jnp.asarray(r.integers(0, 40, (3, 9)), jnp.int32)
    mask = jnp.asarray(r.integers(0, 2, (3, 9)), jnp.int32)

    def ref(x):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(x), tgt[..., None], -1)[..., 0]
        return jnp.sum(nll * mask)

    (got, n), g = jax.value_and_grad(xent_sum, has_aux=True)(logits, tgt, mask)
    np.testing.assert_allclose(got, ref(logits), rtol=1e-6)
    assert n == mask.sum()
    np.testing.assert_allclose(g, jax.grad(ref)(logits), atol=1e-6)
    assert not np.asarray(g)[np.asarray(mask) == 0].any()  # masked tokens: no gradient
    g16 = jax.grad(lambda x: token_nll(x, tgt).sum())(logits.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("live", ["random", "few"])
def test_fused_head_loss_matches_explicit_logits(dtype, live, monkeypatch):
    """The chunked head+loss gives the loss and the h / w gradients of the plain logits path,
    across several chunks and with masked-out tokens; with few tokens in the loss ("few") the
    chunks past them are skipped, and what masked-out rows hold (NaN here) changes nothing."""
    monkeypatch.setattr(kernels, "TOKENS_PER_CHUNK", 8)  # 27 tokens -> 4 chunks
    computed = []  # one entry per chunk whose logits are computed, at run time
    chunk_nll = kernels._chunk_nll

    def counted(*args):
        jax.debug.callback(lambda: computed.append(1))
        return chunk_nll(*args)

    monkeypatch.setattr(kernels, "_chunk_nll", counted)
    r = np.random.default_rng(2)
    h = r.standard_normal((3, 9, 16))
    w = jnp.asarray(r.standard_normal((40, 16)) / 4, dtype)
    tgt = jnp.asarray(r.integers(0, 40, (3, 9)), jnp.int32)
    mask = r.integers(0, 2, (3, 9)) if live == "random" else np.isin(np.arange(27), [4, 20, 26])
    mask = jnp.asarray(mask.reshape(3, 9), jnp.int32)
    assert len(kernels._chunks(27)) == 4
    clean = jnp.asarray(h, dtype)
    dirty = jnp.asarray(np.where(np.asarray(mask)[..., None] == 0, np.nan, h), dtype)

    def ref(h, w):
        logits = jnp.einsum("bld,vd->blv", h, w, preferred_element_type=jnp.float32)
        return xent_sum(logits, tgt, mask)[0]

    want, (dh, dw) = jax.value_and_grad(ref, argnums=(0, 1))(clean, w)
    loss = jax.jit(jax.value_and_grad(kernels.head_loss_sum, argnums=(0, 1)))
    got, (gh, gw) = loss(dirty, w, tgt, mask)
    jax.effects_barrier()
    n_live = int(np.asarray(mask).sum())
    assert len(computed) == -(-n_live // 8)  # the chunks past the live tokens are skipped
    np.testing.assert_allclose(got, want, rtol=1e-6)
    computed.clear()
    no_grad = jax.jit(lambda *a: kernels.head_loss_sum(*a))  # a fresh trace: counted is this test's
    np.testing.assert_allclose(no_grad(dirty, w, tgt, mask), want, rtol=1e-6)  # skips the same chunks
    jax.effects_barrier()
    assert len(computed) == -(-n_live // 8)
    assert gh.dtype == dtype and gw.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(gh, np.float32), np.asarray(dh, np.float32), atol=tol)
    np.testing.assert_allclose(np.asarray(gw, np.float32), np.asarray(dw, np.float32), atol=tol)
    assert not np.asarray(gh)[np.asarray(mask) == 0].any()  # masked tokens: no gradient


def test_linear_gradients_match_autodiff():
    r = np.random.default_rng(3)
    x = jnp.asarray(r.standard_normal((2, 5, 6)), jnp.float32)
    w = jnp.asarray(r.standard_normal((6, 7)), jnp.float32)
    ct = jnp.asarray(r.standard_normal((2, 5, 7)), jnp.float32)
    want = jax.grad(lambda x, w: jnp.sum((x @ w) * ct), argnums=(0, 1))(x, w)
    got = jax.jit(jax.grad(lambda x, w: jnp.sum(kernels.linear(x, w) * ct), argnums=(0, 1)))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
