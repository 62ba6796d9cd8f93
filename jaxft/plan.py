"""`jaxft plan`: per-device memory of a full fine-tuning step, without allocating weights.

The train step is compiled ahead of time for abstract (shape-only) params, optimizer state and
batch on a mesh of fake CPU devices; XLA's memory analysis then gives the bytes each device
needs. CPU XLA lays out buffers much like the TPU/GPU compilers, but fusion decisions differ, so
treat temporaries as an estimate within tens of percent; params and optimizer bytes are exact.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import jax
import jax.numpy as jnp

from jaxft import kernels, sharding, state
from jaxft.config import MeshConfig, OptimConfig, at_least, check_batch_split, get_preset
from jaxft.errors import ConfigError
from jaxft.optim import make_optimizer
from jaxft.step import compile_train_step

GiB = 1024**3


def parse_mesh(text: str) -> MeshConfig:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in sizes or not v.isdigit() or int(v) < 1:
            raise ConfigError(f"--mesh {text!r}: expected axis=N with axes {', '.join(sizes)}")
        sizes[k] = int(v)
    return MeshConfig(**sizes)


def _bytes_per_device(tree) -> int:
    total = 0
    for a in jax.tree.leaves(tree):
        shard = a.sharding.shard_shape(a.shape)
        total += math.prod(shard) * a.dtype.itemsize
    return total


def plan(preset: str, mesh_cfg, batch: int, seq: int, remat: str = "none",
         dtype: str = "bfloat16", grad_accum: int = 1) -> dict:
    """Compiles the train step for abstract inputs and returns per-device byte counts, and the
    param dims left replicated because their mesh axes do not divide them."""
    cfg = dataclasses.replace(get_preset(preset), remat=remat, dtype=dtype,
                              max_seq_len=max(seq, get_preset(preset).max_seq_len))
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if n > jax.device_count():
        raise ConfigError(f"mesh needs {n} devices, but {jax.device_count()} are available")
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
    layout = state.make_layout(cfg, mesh, make_optimizer(OptimConfig(), 1000))
    bsh = sharding.batch_sharding(mesh)
    abs_batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=bsh)
                 for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    with kernels.kernel_path("accelerator"):  # plan what an accelerator runs, not the CPU kernels
        compiled = compile_train_step(layout, grad_accum).lower(
            layout.abs_params, layout.abs_opt, abs_batch).compile()
    replicated = sharding.replicated_dims(state.abstract_model(cfg, mesh)[1], mesh)
    ma = compiled.memory_analysis()
    params_b, opt_b = _bytes_per_device(layout.abs_params), _bytes_per_device(layout.abs_opt)
    temp_b = int(ma.temp_size_in_bytes)
    peak = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
               - ma.alias_size_in_bytes + temp_b)
    return {"preset": preset, "mesh": dict(mesh.shape), "devices": mesh.size, "batch": batch,
            "seq": seq, "remat": remat, "dtype": dtype, "grad_accum": grad_accum,
            "params_bytes": params_b, "opt_bytes": opt_b, "temp_bytes": temp_b, "peak_bytes": peak,
            "replicated": replicated}


def _ensure_devices(n: int) -> None:
    """Re-executes this command with n fake CPU devices if the backend has not got them."""
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag in os.environ.get("XLA_FLAGS", ""):
        return
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
               JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, "-m", "jaxft", *sys.argv[1:]], env)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-device memory of a train step, by ahead-of-time compile")
    p.add_argument("--model", required=True, help="model preset, e.g. llama2-7b")
    p.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or fsdp=16,tensor=4")
    p.add_argument("--batch", type=at_least(1), default=8, help="global batch rows")
    p.add_argument("--seq", type=at_least(1), default=4096)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay fp32)")
    p.add_argument("--grad-accum", type=at_least(1), default=1, metavar="K",
                   help="microbatches per step (each of batch/K rows); must divide --batch")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    mesh_cfg = parse_mesh(args.mesh)
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    if sys.argv[1:2] == ["plan"]:
        _ensure_devices(n)
    check_batch_split(args.batch, grad_accum=args.grad_accum, names=("--batch", "--grad-accum"))
    r = plan(args.model, mesh_cfg, args.batch, args.seq, args.remat, args.dtype, args.grad_accum)
    print(f"{r['preset']} on mesh {r['mesh']} ({r['devices']} devices), batch {r['batch']} x "
          f"seq {r['seq']}" + (f" in {args.grad_accum} microbatches" if args.grad_accum > 1 else "")
          + f", remat={r['remat']}, compute {r['dtype']}, fp32 params + AdamW")
    for k in ("params", "opt", "temp", "peak"):
        label = {"params": "params", "opt": "optimizer state", "temp": "temporaries/activations",
                 "peak": "peak total"}[k]
        print(f"  {label:<26}{r[k + '_bytes'] / GiB:10.2f} GiB per device")
    for name, shape, axis in r["replicated"]:
        print(f"  replicated: {name} {list(shape)}: {axis!r} is not divisible by its mesh axes")
    for name, cap in (("v5e", 16), ("v5p", 95)):
        print(f"  fits in {name} ({cap} GiB): {'yes' if r['peak_bytes'] <= cap * GiB else 'no'}")
    return 0
