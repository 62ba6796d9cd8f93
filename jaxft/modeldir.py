"""A model directory: what `jaxft convert` writes and `jaxft.load` reads.

    DIR/config.json    the jaxft ModelConfig
    DIR/params/        Orbax checkpoint of the params (a pure dict of arrays)
    DIR/tokenizer/     tokenizer files (tokenizer.model or tokenizer.json, plus added tokens)

Writes go to a sibling temp dir renamed into place at the end, so a crash never leaves a
half-written DIR; an existing DIR is only replaced when `force` is set.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxft.config import ModelConfig, from_dict
from jaxft.distributed import barrier
from jaxft.errors import ConfigError, OutputExistsError


def check_output(out: str | os.PathLike, force: bool, inputs=()) -> Path:
    """`out` if it may be written: it must not exist unless `force`, and it must never be, or
    contain, one of `inputs` (replacing it would delete what is being read)."""
    out = Path(out)
    for src in map(Path, inputs):
        if src.resolve() == out.resolve() or src.resolve().is_relative_to(out.resolve()):
            raise OutputExistsError(f"--out {out} is or contains the input {src}; "
                                    "write the output somewhere else (--force does not apply)")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to overwrite it")
    return out


@contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False, inputs=()):
    """Yields a temp dir beside `out`; on success it replaces `out`, on error it is removed.
    In a multi-process run every process gets the same temp dir (Orbax writes each process's
    shards into it) and only process 0 creates, renames or removes it."""
    out = check_output(out, force, inputs)
    primary = jax.process_index() == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if jax.process_count() == 1:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    else:
        tmp = out.parent / f".{out.name}.partial-{jax.process_count()}proc"
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier(f"atomic_dir {tmp}")
    try:
        yield tmp
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(f"atomic_dir {tmp} written")
    if primary:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier(f"atomic_dir {out} in place")


def write_config(d: Path, cfg: ModelConfig) -> None:
    (d / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def read_config(d: str | os.PathLike) -> ModelConfig:
    p = Path(d) / "config.json"
    if not p.is_file():
        raise ConfigError(f"{d} is not a jaxft model directory: {p.name} is missing")
    return from_dict(ModelConfig, json.loads(p.read_text()), str(p))


def save_params(d: Path, params: dict) -> None:
    """Saves a pure dict of arrays (possibly sharded) to DIR/params with Orbax."""
    ocp.Checkpointer(_handler(params)).save((d / "params").absolute(),
                                            args=ocp.args.StandardSave(params))


def _handler(tree) -> ocp.StandardCheckpointHandler:
    """Orbax encodes every array it has in flight before writing, which for real weights (which
    do not compress) holds a second copy of the model in host memory. Capping the bytes in
    flight at the largest array (Orbax refuses a cap below that) bounds the extra to one array
    (figures in bench/RESULTS.md)."""
    largest = max((x.nbytes for x in jax.tree.leaves(tree)), default=1)
    return ocp.StandardCheckpointHandler(save_concurrent_gb=largest * 1.001 / 1e9 + 1e-3)


def load_params(d: str | os.PathLike, abstract: dict) -> dict:
    """Restores DIR/params into the shapes, dtypes and shardings of `abstract`."""
    return ocp.StandardCheckpointer().restore((Path(d) / "params").absolute(), abstract)


def save_model(out: str | os.PathLike, model, tokenizer=None, force: bool = False) -> Path:
    with atomic_dir(out, force) as tmp:
        save_params(tmp, nnx.state(model, nnx.Param).to_pure_dict())  # every process: its shards
        if jax.process_index() == 0:
            write_config(tmp, model.cfg)
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer")
    return Path(out)
