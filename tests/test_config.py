import pytest

from jaxft import sharding
from jaxft.config import ConfigError, MeshConfig, load_config


def test_unknown_key_lists_valid_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: tiny\noptim: {learning_rate: 1.0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "learning_rate" in msg and "lr" in msg and "warmup_steps" in msg


def test_wrong_type_names_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps.*int"):
        load_config(None, ["preset=tiny", "train.steps=many"])


def test_overrides_are_typed_and_preset_resolved():
    cfg = load_config("configs/tiny-viggo.yaml", ["optim.lr=0.5", "model.dim=32", "data.limit=7"])
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dim == 32 and cfg.model.n_layers == 2  # the rest comes from the preset
    assert cfg.data.limit == 7


def test_unknown_preset_and_bad_choice():
    with pytest.raises(ConfigError, match="llama2-7b"):
        load_config(None, ["preset=llama9"])
    with pytest.raises(ConfigError, match="pack, longest, max_length"):
        load_config(None, ["preset=tiny", "data.padding=bucket"])


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
