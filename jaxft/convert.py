"""`jaxft convert`: HF Llama directories (safetensors or legacy .bin) <-> jaxft model
directories, GGUF files in (`jaxft.gguf`) and out (`jaxft.gguf_export`).

The mapping is one key table, `jaxft.keymap.TABLE`, and its one layout rule.

Conversion streams tensor by tensor: it holds one copy of the params (being built or read back)
plus one tensor or one output shard; Orbax's write buffers come on top (bench/convert_memory.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from gguf import GGUFReader
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxft.config import ModelConfig
from jaxft.errors import ConvertError
from jaxft.gguf import GGUFWeights, config_from_gguf, tokenizer_files
from jaxft.gguf_export import to_gguf
from jaxft.keymap import IGNORED, Entry, hf_names, hf_shape, jaxft_shapes, to_hf, to_jaxft
from jaxft.model import VOCAB_PARAMS
from jaxft.modeldir import (atomic_dir, check_output, load_params, read_config, save_params,
                            write_config)
from jaxft.state import abstract_params
from jaxft.tokenizer import load_tokenizer

log = logging.getLogger("jaxft")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
DTYPES = ("float32", "bfloat16", "float16")


def _rope_scaling(sc: dict | None, where: str) -> dict | None:
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConvertError(f"{where}: rope type {kind!r} is not supported (only default and llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    if missing := [k for k in keys if k not in sc]:
        raise ConvertError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: sc[k] for k in keys}}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from an HF Llama config.json (transformers 4 or 5 style)."""
    if hf.get("model_type", "llama") != "llama":
        raise ConvertError(f"{where}: model_type {hf['model_type']!r} is not a Llama model")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise ConvertError(f"{where}: {key}={hf[key]!r} is not supported (jaxft needs {want!r})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in hf:
            raise ConvertError(f"{where}: missing field {key!r}")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = _rope_scaling(hf.get("rope_scaling") or rope, where)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0, ffn_dim=hf["intermediate_size"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta), rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048))


def config_to_hf(cfg: ModelConfig) -> dict:
    """An HF config.json that transformers 5 loads as LlamaForCausalLM."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_type": "llama3", "rope_theta": cfg.rope_theta}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_size, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False, "mlp_bias": False, "dtype": cfg.param_dtype}


@contextmanager
def reading(path: Path, what: str):
    """Turns any failure to read `path` (truncated, not that format, refused by a safe loader)
    into one ConvertError naming the file."""
    try:
        yield
    except ConvertError:
        raise
    except Exception as e:  # third-party readers raise their own types: name the file instead
        raise ConvertError(f"{path}: cannot read it as {what} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


class HFWeights:
    """Names and tensors of an HF checkpoint, read one tensor at a time."""

    def __init__(self, src: Path):
        self.where: dict[str, Path] = {}  # tensor name -> file
        self._bin: tuple[Path, dict] | None = None  # the .bin file open now, memory-mapped
        for index, single in (("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            self.torch = single.endswith(".bin")
            if (src / index).is_file():
                wmap = json.loads((src / index).read_text()).get("weight_map")
                if not isinstance(wmap, dict):
                    raise ConvertError(f"{src / index}: missing field 'weight_map'")
                self.where = {k: src / v for k, v in wmap.items()}
                break
            if (src / single).is_file():
                self.where = {k: src / single for k in self._keys(src / single)}
                break
        else:
            raise ConvertError(f"{src}: no model.safetensors(.index.json) or pytorch_model.bin found")

    def _keys(self, path: Path) -> list[str]:
        if self.torch:
            return list(self._torch_file(path))
        with reading(path, "safetensors"), safe_open(path, framework="numpy") as f:
            return list(f.keys())

    def _torch_file(self, path: Path) -> dict:
        if self._bin is None or self._bin[0] != path:
            import torch  # only legacy checkpoints need torch
            with reading(path, "a PyTorch weights-only checkpoint"):
                self._bin = (path, torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        return self._bin[1]

    def get(self, name: str) -> np.ndarray:
        path = self.where[name]
        if not self.torch:
            # Opened per tensor: closing unmaps the file, so read pages never pile up in RSS.
            with reading(path, "safetensors"), safe_open(path, framework="numpy") as f:
                return f.get_tensor(name)
        t = self._torch_file(path)[name]
        if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; reinterpret the bits
            import torch  # loaded already by _torch_file
            return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def from_hf(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Converts an HF Llama directory into a jaxft model directory at `out`."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such HF model directory")
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{src}: config.json is missing")
    try:
        cfg = config_from_hf(json.loads(cfg_path.read_text()), str(cfg_path))
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    return convert_weights(cfg, HFWeights(src), src, out, force, lambda d: _copy_tokenizer(src, d))


def convert_weights(cfg: ModelConfig, weights, src, out, force: bool, write_tokenizer) -> Path:
    """Fills the jaxft params from `weights` (`.where`: HF names, `.get(name)`: one array)
    tensor by tensor, then writes the model dir; errors name `src` and the tensor."""
    check_output(out, force, [src])  # before the first tensor, not after the last
    names = hf_names(cfg)
    expected = {n for n, _, _ in names}
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings else set()  # a redundant copy if there
    for bad, what in ((sorted(expected - weights.where.keys()), "is missing"),
                      (sorted(n for n in weights.where.keys() - expected - tied_head
                              if not IGNORED.fullmatch(n)), "is unexpected (not a Llama weight)")):
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ConvertError(f"{src}: tensor {bad[0]} {what}{more}")
    # Keep the checkpoint's bytes: its dtype becomes the param dtype. Compute stays float32.
    with reading(src, "model weights"):
        dtype = weights.get("model.embed_tokens.weight").dtype.name
    cfg.param_dtype, cfg.dtype = (dtype if dtype in DTYPES else "float32"), "float32"
    shapes = jaxft_shapes(cfg)
    params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract_params(cfg))  # pad rows: 0
    for name, entry, layer in names:
        with reading(src, "model weights"):
            w = weights.get(name)
        want = hf_shape(entry, cfg, shapes)
        if w.shape != want:
            raise ConvertError(f"{src}: tensor {name} has shape {list(w.shape)}, expected {list(want)}")
        target = _at(params, entry.path)[() if layer is None else layer]
        if entry.path[0] in VOCAB_PARAMS:
            target = target[: cfg.vocab_size]
        target[...] = to_jaxft(w.astype(target.dtype, copy=False), entry, target.shape)
    return write_model_dir(out, cfg, params, force, write_tokenizer, inputs=[src])


def write_model_dir(out, cfg: ModelConfig, params: dict, force: bool, write_tokenizer,
                    inputs=()) -> Path:
    """Writes config, params (numpy leaves, replaced in place) and `write_tokenizer(dir)`."""
    _to_device(params)  # Orbax saves jax arrays with one transient host copy less than numpy
    with atomic_dir(out, force, inputs) as tmp:
        write_config(tmp, cfg)
        save_params(tmp, params)
        write_tokenizer(tmp / "tokenizer")
    return Path(out)


def _to_device(tree: dict) -> None:
    """Replaces each numpy leaf by a jax array in place, one at a time (one copy at most)."""
    for k, v in tree.items():
        if isinstance(v, dict):
            _to_device(v)
        else:
            tree[k] = jax.device_put(v)


def _at(tree: dict, path: tuple[str, ...]):
    return tree if not path else _at(tree[path[0]], path[1:])


def _copy_tokenizer(src: Path, dst: Path) -> None:
    files = [src / n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not files:
        log.warning("%s has no tokenizer files (%s): the output has no tokenizer, so "
                    "`jaxft eval`/`generate` will refuse it until one is added", src,
                    ", ".join(TOKENIZER_FILES[:2]))
    if files:
        dst.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dst / f.name)


def parse_size(s: str | int) -> int:
    """'5GB' -> 5e9 bytes, '200MiB' -> 200 * 2**20; a bare number is bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", s, re.IGNORECASE)
    if not m:
        raise ConvertError(f"--max-shard-size {s!r}: expected a size such as 5GB or 500MB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def read_params_host(d: Path, cfg: ModelConfig) -> dict:
    """The params of a model dir as host arrays (no mesh, no sharded placement)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return load_params(d, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                                       abstract_params(cfg)))


def to_hf_dir(ckpt: str | Path, out: str | Path, force: bool = False,
              max_shard_size: str | int = "5GB") -> Path:
    """Writes a jaxft model directory as an HF Llama directory loadable by transformers."""
    ckpt, limit = Path(ckpt), parse_size(max_shard_size)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such jaxft model directory")
    check_output(out, force, [ckpt])
    cfg = read_config(ckpt)
    params, shapes = read_params_host(ckpt, cfg), jaxft_shapes(cfg)
    shards: list[list[tuple[str, Entry, int | None]]] = [[]]
    size = 0
    for item in hf_names(cfg):  # greedy packing in name order, as HF does
        nbytes = math.prod(hf_shape(item[1], cfg, shapes)) * np.dtype(_at(params, item[1].path).dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    with atomic_dir(out, force, [ckpt]) as tmp:
        special_ids = _save_tokenizer(ckpt / "tokenizer", tmp)
        hf_cfg = {**config_to_hf(cfg), **special_ids}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = ("model.safetensors" if len(shards) == 1
                     else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {}
            for name, entry, layer in shard:
                w = np.asarray(_at(params, entry.path))
                tensors[name] = to_hf(w if layer is None else w[layer], entry, hf_shape(entry, cfg, shapes))
                weight_map[name] = fname
                total += tensors[name].nbytes
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(out)


def _save_tokenizer(tok_dir: Path, dst: Path) -> dict:
    """Copies the model dir's tokenizer files (jaxft's Tokenizer.save already writes them the
    way transformers reads them); a bare tokenizer file gets its tokenizer_config.json from
    jaxft's tokenizer. Returns the special ids for config.json."""
    if not tok_dir.is_dir():
        return {}
    _copy_tokenizer(tok_dir, dst)
    try:
        tok = load_tokenizer(tok_dir)
    except (ValueError, FileNotFoundError):  # files we cannot read are still passed on
        return {}
    if not (dst / "tokenizer_config.json").is_file():
        tok.save(dst, force=True)
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert HF Llama weights to and from jaxft",
                              description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="HF Llama directory to import")
    src.add_argument("--to-hf", metavar="CKPT", help="jaxft model directory to export")
    src.add_argument("--from-gguf", metavar="FILE", help="llama.cpp GGUF file to import")
    src.add_argument("--to-gguf", metavar="CKPT", help="jaxft model directory to export as one "
                     "GGUF file (an Ollama Modelfile is written beside it)")
    p.add_argument("--out", required=True, help="directory (or, with --to-gguf, file) to write")
    p.add_argument("--type", default="f32", choices=("f32", "f16", "bf16", "q8_0"),
                   help="GGUF export: type of the 2-D weights (norms stay f32)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--max-shard-size", default="5GB", help="HF export: bytes per safetensors file")
    p.set_defaults(func=main)
    return p


def from_gguf(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Converts a llama.cpp GGUF Llama file into a jaxft model directory at `out`."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    with reading(src, "GGUF"):
        reader = GGUFReader(src)
        cfg = config_from_hf(config_from_gguf(reader, src), str(src))
        files = tokenizer_files(reader, src)

    def write_tokenizer(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (d / name).write_text(text, encoding="utf-8")

    weights = GGUFWeights(reader, src, cfg.n_heads, cfg.n_kv_heads)
    return convert_weights(cfg, weights, src, out, force, write_tokenizer)


def main(args) -> int:
    if args.from_hf:
        out = from_hf(args.from_hf, args.out, args.force)
    elif args.to_hf:
        out = to_hf_dir(args.to_hf, args.out, args.force, args.max_shard_size)
    elif args.to_gguf:
        out = to_gguf(args.to_gguf, args.out, args.type, args.force)
    else:
        out = from_gguf(args.from_gguf, args.out, args.force)
    print(f"wrote {out}")
    return 0
