"""bench/step_profile.py: a traced step's ops are labelled with the jaxft function they were
traced from, and the step's wall time is split between them without losing any."""
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxft.kernels import kernel_path, linear
from jaxft.model import rms_norm

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def step_profile(monkeypatch_module):
    monkeypatch_module.syspath_prepend(str(BENCH))  # it imports bench/train_step.py as a sibling
    spec = importlib.util.spec_from_file_location("step_profile", BENCH / "step_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_ops_are_labelled_and_the_wall_time_is_shared(step_profile, tmp_path):
    def loss(x_MxI, w_IxO, norm_I):
        return jnp.sum(linear(rms_norm(x_MxI, norm_I, 1e-6), w_IxO) ** 2)

    with kernel_path("cpu"):  # linear's own VJP, as a CPU train step traces it
        f = jax.jit(jax.grad(loss, argnums=(1, 2)))
        args = (jnp.ones((256, 128)), jnp.ones((128, 64)) / 8, jnp.ones(128))
        labels = step_profile.op_labels(f.lower(*args).compile().as_text())
    jax.block_until_ready(f(*args))
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        jax.block_until_ready(f(*args))

    assert {"kernels.py:linear", "model.py:rms_norm"} <= set(labels.values())
    ops = step_profile.trace_ops(str(tmp_path))
    assert ops and all(not e["name"].startswith("ThunkExecutor") for e in ops)
    traced = {labels.get(e["name"]) for e in ops}
    assert "model.py:rms_norm" in traced and any(str(lab).startswith("kernels.py:") for lab in traced)
    wall, thread, span = step_profile.wall_shares(ops, labels)
    assert sum(wall.values()) == pytest.approx(span)
    assert sum(thread.values()) == pytest.approx(sum(e["dur"] for e in ops))
