"""The training loss: masked cross-entropy sums, and the CPU kernels' path against the
accelerators' plain one on a whole tiny model (the path every TPU/GPU user runs)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxft import kernels, loss, state
from jaxft.config import MeshConfig
from jaxft.sharding import make_mesh


def _batch(cfg, b=4, l=48, seed=0):
    """Two packed examples per row, the last slots padding, the prompts masked."""
    r = np.random.default_rng(seed)
    ids = r.integers(1, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    seg = np.zeros((b, l), np.int32)
    seg[:, :20], seg[:, 20:40] = 1, 2
    pos = np.where(seg == 2, np.arange(l) - 20, np.arange(l)) * (seg > 0)
    mask = (seg > 0) & (pos >= 5)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask.astype(np.int32),
            "segment_ids": seg, "positions": pos.astype(np.int32)}


def _loss_and_grads(model, batch, path):
    graphdef, params = nnx.split(model)

    def f(p):
        total, n = loss.batch_loss_sum(nnx.merge(graphdef, p), batch)
        return total / n

    with kernels.kernel_path(path):  # traced here, so each path compiles its own program
        return jax.jit(jax.value_and_grad(f))(params)


def test_cpu_kernels_and_accelerator_path_agree(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, vocab_size=500)  # real vocab < padded: head slicing too
    model = state.init_model(cfg, make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]), seed=1)
    batch = _batch(cfg)
    (l_cpu, g_cpu), (l_acc, g_acc) = (_loss_and_grads(model, batch, p) for p in ("cpu", "accelerator"))
    assert np.isfinite(float(l_cpu)) and float(l_cpu) > 1.0
    np.testing.assert_allclose(float(l_cpu), float(l_acc), rtol=1e-6)
    flat_cpu, flat_acc = jax.tree.leaves(g_cpu), jax.tree.leaves(g_acc)
    assert len(flat_cpu) == len(flat_acc) > 5
    for a, b in zip(flat_cpu, flat_acc):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    assert any(float(jnp.abs(g).max()) > 1e-4 for g in flat_cpu)  # the gradients are not all zero


def test_kernel_path_is_scoped_and_checked():
    with kernels.kernel_path("accelerator"):
        assert not kernels.cpu_kernels()
        with kernels.kernel_path("cpu"):
            assert kernels.cpu_kernels()
        assert not kernels.cpu_kernels()
    assert kernels.cpu_kernels() == (jax.default_backend() == "cpu")
    try:
        with kernels.kernel_path("gpu"):
            pass
    except ValueError as e:
        assert "choose one of: cpu, accelerator, auto" in str(e)
    else:
        raise AssertionError("an unknown path was accepted")


def test_xent_sum_counts_only_masked_in_tokens():
    logits = jnp.zeros((1, 4, 10))  # uniform: every token costs log(10)
    total, n = loss.xent_sum(logits, jnp.array([[1, 2, 3, 4]]), jnp.array([[0, 1, 1, 0]]))
    assert float(n) == 2.0
    np.testing.assert_allclose(float(total), 2 * np.log(10), rtol=1e-6)
