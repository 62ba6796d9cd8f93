"""The jaxft Llama against HF transformers' PyTorch LlamaForCausalLM (random init, fp32), and
the properties training and generation rely on: sharding, causality, KV cache, packing,
mixed precision, remat."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxft import convert, modeldir, sharding, state
from jaxft.config import MeshConfig
from jaxft.loss import batch_loss_sum

HF_KW = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, 100, (2, 48))
IDS8 = RNG.integers(0, 100, (8, 16))


def hf_model(**kw):
    """A random HF Llama whose every weight (norms included) is non-trivial."""
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **kw}))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name
                    else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return m.eval()


def to_jaxft(m, tmp, **cfg_changes):
    """Saves the HF model, converts it, and loads it as a single-device jaxft model."""
    m.save_pretrained(tmp / "hf")
    convert.from_hf(tmp / "hf", tmp / "jx")
    cfg = dataclasses.replace(modeldir.read_config(tmp / "jx"), **cfg_changes)
    return state.load_model(tmp / "jx", cfg=cfg)


@nnx.jit
def forward(model, ids_BxL):
    return model(ids_BxL)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """GQA, untied: the model the property tests below run on, and its HF reference logits."""
    tmp = tmp_path_factory.mktemp("base")
    m = hf_model()
    model = to_jaxft(m, tmp)
    with torch.no_grad():
        ref = m(torch.tensor(IDS)).logits.numpy()
    return tmp / "jx", model, ref


CASES = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(tie_word_embeddings=True),
    "mqa-head_dim-12": dict(num_key_value_heads=1, head_dim=12),
    "gqa-llama3-rope": dict(rope_parameters=LLAMA3),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    m = hf_model(**CASES[case])
    model = to_jaxft(m, tmp_path)
    with torch.no_grad():
        ref = m(torch.tensor(IDS)).logits.numpy()
    out = np.asarray(forward(model, jnp.asarray(IDS)))
    assert out.shape == ref.shape == (2, 48, 100)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    if case == "gqa-llama3-rope":  # positions past 16 do feel the scaling
        plain = to_jaxft(hf_model(), tmp_path / "plain")
        assert np.abs(np.asarray(forward(plain, jnp.asarray(IDS))) - out).max() > 1e-2


def test_base_matches_transformers(base):
    _, model, ref = base
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(IDS))), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("axes,wq_spec,embed_spec", [
    ({"fsdp": 4, "tensor": 2}, P(None, "fsdp", "tensor", None), P("tensor", "fsdp")),
    ({"data": 2, "fsdp": 4}, P(None, "fsdp", None, None), P(None, "fsdp")),
], ids=["fsdp4-tensor2", "data2-fsdp4"])
def test_sharded_forward_matches_single_device(base, axes, wq_spec, embed_spec):
    ckpt, single, _ = base
    want = np.asarray(forward(single, jnp.asarray(IDS8)))
    mesh = sharding.make_mesh(MeshConfig(**{"fsdp": 1, **axes}))
    model = state.load_model(ckpt, mesh)
    wq, emb = model.blocks.attn.wq_DxHxE[...], model.embed_VxD[...]
    assert wq.sharding.spec == wq_spec and emb.sharding.spec == embed_spec
    assert wq.addressable_shards[0].data.size * (8 // axes.get("data", 1)) == wq.size
    ids = jax.device_put(jnp.asarray(IDS8), sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        got = forward(model, ids)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_causality_through_gradients(base):
    _, model, _ = base
    ids_L = RNG.permutation(100)[:12]  # distinct tokens: an embedding row is one position
    graphdef, emb, rest = nnx.split(model, nnx.PathContains("embed_VxD"), ...)

    def logits_at(emb, t):
        return nnx.merge(graphdef, emb, rest)(jnp.asarray(ids_L)[None])[0, t].sum()

    grad = jax.jit(jax.grad(logits_at))
    for t in (0, 5, 11):
        (g_VxD,) = jax.tree.leaves(grad(emb, t))
        g_L = np.abs(np.asarray(g_VxD)[ids_L]).sum(-1)
        assert (g_L[t + 1:] == 0).all(), f"position {t} sees the future"
        assert (g_L[: t + 1] > 0).all(), f"position {t} does not see its past"


def test_kv_cache_prefill_and_decode_match_full_forward(base):
    _, model, _ = base
    ids = jnp.asarray(IDS[:, :14])
    want = np.asarray(forward(model, ids))
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    cache = model.init_cache(2, 20)  # more slots than tokens: the unused ones must not leak in
    got = []
    for lo, hi in [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 14)]:  # prefill, chunk, decode
        logits, cache = step(model, ids[:, lo:hi], cache)
        got.append(np.asarray(logits))
    assert int(cache["index"]) == 14
    np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5, rtol=0)


def test_packed_rows_equal_separate_examples(base):
    _, model, _ = base
    a, b = IDS[0, :5], IDS[1, :7]
    ids = np.zeros((2, 16), np.int64)
    seg = np.zeros((2, 16), np.int32)
    pos = np.zeros((2, 16), np.int32)
    for row, parts in enumerate([(a, b), (b, a)]):
        start = 0
        for k, x in enumerate(parts):
            ids[row, start:start + len(x)], seg[row, start:start + len(x)] = x, k + 1
            pos[row, start:start + len(x)] = np.arange(len(x))
            start += len(x)
    packed = np.asarray(nnx.jit(lambda m, i, p, s: m(i, p, s))(
        model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))
    alone_a = np.asarray(forward(model, jnp.asarray(a)[None]))[0]
    alone_b = np.asarray(forward(model, jnp.asarray(b)[None]))[0]
    for got, want in [(packed[0, :5], alone_a), (packed[0, 5:12], alone_b),
                      (packed[1, :7], alone_b), (packed[1, 7:12], alone_a)]:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bf16_compute_with_fp32_params(base):
    ckpt, model, _ = base
    cfg = dataclasses.replace(model.cfg, dtype="bfloat16")
    mixed = state.load_model(ckpt, cfg=cfg)
    assert mixed.blocks.mlp.w_up_DxF[...].dtype == jnp.float32
    want = np.asarray(forward(model, jnp.asarray(IDS)))
    got = forward(mixed, jnp.asarray(IDS))
    assert got.dtype == jnp.float32
    err = np.abs(np.asarray(got) - want).max()
    assert 0 < err < 0.05 * np.abs(want).max(), err  # bf16 really used, and still close
    assert (np.asarray(got).argmax(-1) == want.argmax(-1)).mean() > 0.9


def _grads(model):
    ids = jnp.asarray(IDS[:, :16])

    def loss(m):
        logp = jax.nn.log_softmax(m(ids[:, :-1]))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    return nnx.jit(nnx.grad(loss))(model)


def test_remat_policies_give_identical_gradients(base):
    ckpt, model, _ = base
    ref = _grads(model)
    for policy in ("full", "dots"):
        other = state.load_model(ckpt, cfg=dataclasses.replace(model.cfg, remat=policy))
        got = _grads(other)
        for (path, g), (_, h) in zip(jax.tree_util.tree_leaves_with_path(ref),
                                     jax.tree_util.tree_leaves_with_path(got)):
            assert np.abs(np.asarray(g)).max() > 0, path
            np.testing.assert_allclose(np.asarray(h), np.asarray(g), atol=1e-6, rtol=1e-5,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")


def test_training_gradients_match_transformers(tmp_path):
    """The training loss (fused head, block attention, `linear`'s VJP) and every parameter's
    gradient against torch autograd on HF's model. Tied embeddings: the head's gradient and
    the embedding lookup's gradient land on one tensor."""
    m = hf_model(tie_word_embeddings=True)
    model = to_jaxft(m, tmp_path)
    ids = torch.tensor(IDS)
    tgt = ids[:, 1:].clone()
    tgt[0, :10] = -100  # a masked prompt
    out = m(ids[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(out.flatten(0, 1), tgt.flatten(), reduction="sum")
    want.backward()
    # The gradients, saved as an HF checkpoint and converted, land in jaxft's layout.
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.grad)
    m.save_pretrained(tmp_path / "grad_hf")
    convert.from_hf(tmp_path / "grad_hf", tmp_path / "grad_jx")
    ref = nnx.state(state.load_model(tmp_path / "grad_jx"), nnx.Param)

    b, l = tgt.shape
    batch = {"inputs": jnp.asarray(IDS[:, :-1]), "targets": jnp.asarray(np.maximum(tgt.numpy(), 0)),
             "loss_mask": jnp.asarray((tgt.numpy() >= 0).astype(np.int32)),
             "positions": jnp.broadcast_to(jnp.arange(l), (b, l)), "segment_ids": jnp.ones((b, l), jnp.int32)}
    gdef, params = nnx.split(model, nnx.Param)
    (got, n), grads = jax.jit(jax.value_and_grad(
        lambda p: batch_loss_sum(nnx.merge(gdef, p), batch), has_aux=True))(params)
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5)
    assert n == (tgt >= 0).sum().item()
    v = model.cfg.vocab_size
    for (path, g), (_, r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(ref)):
        g, r = np.asarray(g), np.asarray(r)
        if "embed" in jax.tree_util.keystr(path):
            g, r = g[:v], r[:v]  # padding rows: no gradient on either side
        assert np.abs(r).max() > 0, path
        np.testing.assert_allclose(g, r, atol=2e-5 * np.abs(r).max(), err_msg=jax.tree_util.keystr(path))
