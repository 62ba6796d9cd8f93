"""The mesh and the logical-axis rules: mesh sizes, specs, unknown axes, replicated dims."""
import jax
import pytest
from flax import nnx

from jaxft import sharding, state
from jaxft.config import ConfigError, MeshConfig, get_preset


@pytest.mark.parametrize("mesh,n,shape", [
    (MeshConfig(data=1, fsdp=-1, tensor=1), 8, (1, 8, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=-1, fsdp=1, tensor=4), 8, (2, 1, 4)),
])
def test_mesh_fill(mesh, n, shape):
    assert sharding.mesh_shape(mesh, n) == shape


def test_mesh_mismatch_states_both_counts():
    with pytest.raises(ConfigError, match=r"has 6 devices, but 8 devices"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=2, tensor=1))
    with pytest.raises(ConfigError, match=r"multiple of 3 devices, but 8"):
        sharding.make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


def test_spec_maps_logical_axes_through_the_rules():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.spec(("batch", "length"), (8, 16), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    assert sharding.spec(("embed", "mlp"), (64, 128), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 3 kv heads on tensor=2: that dim stays whole
    assert sharding.spec(("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh) == \
        jax.sharding.PartitionSpec("fsdp", None, None)


def test_unknown_logical_axis_is_an_error():
    mesh = sharding.make_mesh(MeshConfig(fsdp=8))
    with pytest.raises(ValueError, match=r"logical axis 'embd' is not in sharding.RULES; known axes: batch"):
        sharding.spec(("embd", "mlp"), (64, 128), mesh)


def test_replicated_dims_name_the_param_shape_and_axis():
    cfg = get_preset("smollm2-135m")  # 3 kv heads, 9 heads
    mesh = sharding.make_mesh(MeshConfig(fsdp=4, tensor=2))
    _, abs_state = state.abstract_state(cfg)
    found = sharding.replicated_dims(abs_state, mesh)
    names = {(n, a) for n, _, a in found}
    assert ("blocks.attn.wk_DxKxE", "kv_heads") in names and ("blocks.attn.wq_DxHxE", "heads") in names
    shapes = {n: s for n, s, _ in found}
    assert shapes["blocks.attn.wk_DxKxE"] == (30, 576, 3, 64)
    # a mesh that divides everything leaves nothing replicated
    assert sharding.replicated_dims(abs_state, sharding.make_mesh(MeshConfig(fsdp=8))) == []


def test_layout_logs_replicated_dims_once(caplog):
    cfg = get_preset("tiny")  # 4 heads, 2 kv heads: tensor=8 divides neither
    mesh = sharding.make_mesh(MeshConfig(fsdp=1, tensor=8))
    with caplog.at_level("WARNING", logger="jaxft"):
        state.make_layout(cfg, mesh, __import__("optax").sgd(0.1))
    lines = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
    assert any(m.startswith("blocks.attn.wk_DxKxE [2, 64, 2, 16]: its 'kv_heads' dim") for m in lines)
    assert len(lines) == len(set(lines))
