"""The device mesh and THE logical-axis rules table: every sharding decision lives here.

Params carry logical axis names (`axes` metadata, see `jaxft.model`); `RULES` maps each name to
mesh axes. A name missing from `RULES` is an error. A logical dim whose size its mesh axes do not
divide is replicated along them (e.g. SmolLM2's 3 kv heads on tensor=2); `replicated_dims` lists
those, and the trainer and `jaxft plan` report them.
"""
from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxft.config import MeshConfig
from jaxft.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # activations and batches: split rows over all data-parallel axes
    "length": None,
    "vocab": "tensor",
    "embed": "fsdp",  # FSDP/ZeRO-3: params and optimizer state sharded over the model width
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "act_embed": None,  # the model width of activations: whole on each device
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive or -1")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs a multiple of {fixed} devices, "
                f"but {n_devices} devices are available")
        sizes = [n_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
            f"but {n_devices} devices are available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_axes(name: str | None, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that logical axis `name` is split over."""
    if name is None:
        return ()
    if name not in RULES:
        raise ValueError(f"logical axis {name!r} is not in sharding.RULES; "
                         f"known axes: {', '.join(RULES)}")
    rule = RULES[name]
    mesh_axes = (rule,) if isinstance(rule, str) else (rule or ())
    return tuple(a for a in mesh_axes if mesh.shape[a] > 1)


def spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for a value with logical `axes`; indivisible dims stay replicated."""
    out = []
    for name, size in zip(axes, shape):
        mesh_axes = _mesh_axes(name, mesh)
        if not mesh_axes or size % math.prod(mesh.shape[a] for a in mesh_axes):
            out.append(None)
        else:
            out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def replicated_dims(state, mesh: Mesh) -> list[tuple[str, tuple[int, ...], str]]:
    """(param name, shape, logical axis) of every param dim that its rule would shard but whose
    size the mesh axes do not divide: those dims are whole on every device."""
    found = []
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
    for path, v in flat:
        axes = v.get_metadata().get("axes") or (None,) * v.ndim
        for name, size in zip(axes, v.shape):
            mesh_axes = _mesh_axes(name, mesh)
            if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes):
                found.append((jax.tree_util.keystr(path, simple=True, separator="."),
                              tuple(v.shape), name))
    return found


# The mesh activations are pinned to while a step is traced (see `activation_mesh`).
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "jaxft_activation_mesh", default=None)


@contextmanager
def activation_mesh(mesh: Mesh):
    """While tracing under this, `constrain` pins activations to their logical sharding.
    Without it, XLA may keep full-batch activations on every device: the logits matmul
    contracts over the fsdp-sharded width and would otherwise gather [B, L, V] everywhere."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh)))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx State (abstract or concrete), from each param's `axes`."""
    def one(v):
        axes = v.get_metadata().get("axes") or (None,) * v.ndim
        return v.replace(NamedSharding(mesh, spec(axes, v.shape, mesh)))
    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows split over every data-parallel mesh axis; the rest replicated."""
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
