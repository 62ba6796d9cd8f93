"""model_args of the jaxft lm-eval backend, checked and typed before anything is loaded:
path (required), batch_size, max_length (default: the model's max_seq_len), mesh
(DATAxFSDPxTENSOR such as 1x-1x1, or "auto": every device on fsdp; default "1x1x1": one
device), max_gen_toks (default 256), prefix_token_id, seed. No lm-eval import: `jaxft lm-eval`
checks them before lm-eval indexes its tasks.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxft import modeldir, sharding
from jaxft.config import MeshConfig
from jaxft.errors import ConfigError

MODEL_ARGS = ("path", "batch_size", "max_length", "mesh", "max_gen_toks", "prefix_token_id",
              "seed")
HARNESS_ARGS = ("max_batch_size", "device")  # lm-eval passes these to every model; unused here
AUTO_BATCH = 16  # rows per batch for batch_size=auto: one fixed shape, so compiles are reused


class LMEvalError(ConfigError):
    """A model_args value or request the jaxft lm-eval backend cannot use."""


def parse_mesh(value) -> MeshConfig:
    if value in (None, "", "1x1x1"):
        return MeshConfig(data=1, fsdp=1, tensor=1)
    if value == "auto":
        return MeshConfig(fsdp=-1)
    try:
        data, fsdp, tensor = (int(x) for x in str(value).split("x"))
    except ValueError:
        raise LMEvalError(f"model_args mesh={value!r}: expected DATAxFSDPxTENSOR (e.g. 1x-1x1) "
                          "or auto") from None
    return MeshConfig(data=data, fsdp=fsdp, tensor=tensor)


def _positive_int(key: str, value, alternatives: str = "") -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise LMEvalError(f"model_args {key}={value!r}: expected a positive integer{alternatives}")
    return n


def parse_batch_size(value) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return AUTO_BATCH
    return _positive_int("batch_size", value, " or auto")


def check_model_dir(path) -> Path:
    if not path:
        raise LMEvalError("model_args: path=MODEL_DIR is required (a jaxft model directory)")
    d = Path(str(path)).expanduser()
    if not (d / "config.json").is_file():
        raise LMEvalError(f"model_args path={path}: not a jaxft model directory "
                          "(no config.json; make one with `jaxft convert`)")
    if not (d / "tokenizer").is_dir():
        raise LMEvalError(f"{d / 'tokenizer'}: the model directory has no tokenizer; lm-eval "
                          "requests are text, so the jaxft backend needs one")
    return d


def config_bos_id(tok_dir: Path, tok) -> int | None:
    """The bos token named in tokenizer_config.json, which lm-eval's hf backend takes as the
    prefix of empty contexts and rolling windows even when the tokenizer never adds it."""
    cfg_path = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    name = cfg.get("bos_token")
    name = name.get("content") if isinstance(name, dict) else name
    found = tok.token_id(name) if name else None
    return found if found is not None else tok.bos_id


def build_mesh(mc: MeshConfig):
    """The mesh over the first data*fsdp*tensor devices (all of them when a size is -1)."""
    sizes = (mc.data, mc.fsdp, mc.tensor)
    devices = jax.devices() if -1 in sizes else jax.devices()[:int(np.prod(sizes))]
    return sharding.make_mesh(mc, devices)


def check_max_length(value, limit: int, where: Path) -> int:
    if value is None:
        return limit
    n = _positive_int("max_length", value)
    if n > limit:
        raise LMEvalError(f"model_args max_length={n}: the model supports at most {limit} tokens "
                          f"(max_seq_len in {where / 'config.json'})")
    return n


def check_model_args(args: dict) -> dict:
    """model_args checked and typed, before anything is loaded (`jaxft lm-eval` calls this
    before lm-eval indexes its tasks, so a typo fails at once)."""
    unknown = sorted(set(args) - set(MODEL_ARGS) - set(HARNESS_ARGS))
    if unknown:
        raise LMEvalError(f"model_args: unknown key {', '.join(unknown)}; the jaxft backend "
                          f"takes {', '.join(MODEL_ARGS)}")
    d = check_model_dir(args.get("path"))
    out = {"path": d, "batch_size": parse_batch_size(args.get("batch_size", 1)),
           "max_length": check_max_length(args.get("max_length"),
                                          modeldir.read_config(d).max_seq_len, d),
           "mesh": parse_mesh(args.get("mesh")), "device": args.get("device")}
    for key, default in (("max_gen_toks", 256), ("seed", 0), ("prefix_token_id", None)):
        value = args.get(key, default)
        try:
            out[key] = None if value is None else int(value)
        except (TypeError, ValueError):
            raise LMEvalError(f"model_args {key}={value!r}: expected an integer") from None
    return out
