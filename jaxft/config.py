"""Run configuration: one dataclass per concern, strict YAML loading, dotted overrides.

Every field has a comment. Unknown keys and wrong types are errors that name the valid keys,
raised before anything is compiled.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxft.errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # rows of the embedding, before padding to a multiple of 128
    dim: int = 4096  # model (residual) width
    n_layers: int = 32  # transformer blocks
    n_heads: int = 32  # query heads
    n_kv_heads: int = 32  # key/value heads; < n_heads is grouped-query attention
    head_dim: int = 0  # per-head width; 0 means dim // n_heads
    ffn_dim: int = 11008  # SwiGLU hidden width
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    rope_scaling: dict | None = None  # Llama-3 style: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    max_seq_len: int = 4096  # context length the model was trained for (exported as max_position_embeddings)
    param_dtype: str = "float32"  # storage dtype of params (master weights)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: str = "none"  # none | full | dots (save matmul outputs, recompute the rest)
    vocab_multiple: int = 128  # padded vocab is a multiple of this (and of the tensor axis)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads


@dataclass
class MeshConfig:
    data: int = 1  # pure data parallelism (replicated params)
    fsdp: int = -1  # data parallelism with params/optimizer sharded; -1 fills the remaining devices
    tensor: int = 1  # tensor (model) parallelism over heads and MLP width


@dataclass
class DataConfig:
    root: str = ""  # data root; empty means $JAXFT_DATA or ../shared/data
    task: str = "viggo"  # viggo | sql | gsm8k | alpaca | jsonl | csv | chat (conversations)
    train_file: str = "viggo/train.csv"  # relative to root unless absolute
    valid_file: str = "viggo/valid.csv"  # "" means split from train (alpaca: the 85/5/10 split)
    fields: dict | None = None  # generic readers: {"instruction": col, "input": col, "output": col}
    template: str = "special-tokens"  # alpaca | phi3 | special-tokens | llama2-chat | chatml | path/to/template.yaml | tokenizer (the model's own Jinja chat template)
    chat_template: str = ""  # with template=tokenizer: a .jinja file used instead of the tokenizer's (and saved with the model)
    chat_format: str = "auto"  # task=chat: auto (per file) | openai (messages) | sharegpt (conversations)
    include_instruction: bool = False  # prepend the task instruction in templates that allow omitting it
    train_on: str = "response"  # response (prompt masked) | all; chat: assistant (= response) | last_assistant
    padding: str = "pack"  # pack | longest | max_length
    max_length: int = 512  # tokens per row
    overlong: str = "truncate"  # truncate | drop
    batch_size: int = 8  # global rows per step
    seed: int = 0  # shuffling and splitting seed
    limit: int = 0  # keep only the first N training examples (0: all)
    tokenizer: str = ""  # dir with tokenizer.model/tokenizer.json; "" means the checkpoint's, or train one
    train_tokenizer_vocab: int = 0  # >0: train a SentencePiece model of this size from the training text
    worker_count: int = 0  # Grain worker processes per virtual shard (0: in-process)
    shards: int = 0  # virtual shards, each packed on its own; 0: one per batch row. It must divide batch_size and be divisible by the process count


@dataclass
class OptimConfig:
    lr: float = 2e-5  # peak learning rate
    warmup_steps: int = 10  # linear warmup from 0
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    decay_norms_and_embeddings: bool = False  # apply weight decay to norms and embeddings too
    b1: float = 0.9  # Adam beta1
    b2: float = 0.999  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # microbatches per step (batch_size is split into this many)


@dataclass
class TrainConfig:
    init: str = ""  # checkpoint dir to fine-tune from; "" trains from scratch
    steps: int = 100  # optimizer steps
    seed: int = 0  # param init and dropout rng
    log_every: int = 1  # steps between metrics lines
    eval_every: int = 50  # steps between validation-loss passes; 0 disables
    eval_batches: int = 8  # validation batches per pass (0: the whole validation set)
    patience: int = 0  # stop after this many evals without improvement; 0 disables
    ckpt_every: int = 50  # steps between checkpoints; 0 saves only at the end
    keep: int = 2  # recent checkpoints kept (the best is kept too)
    time_limit_s: float = 0.0  # stop cleanly after this much training time; 0 disables
    tensorboard: bool = False  # also write TensorBoard event files
    progress: bool = True  # draw a progress bar on stderr


@dataclass
class EvalConfig:
    task: str = ""  # viggo | sql | gsm8k | instruct; "" skips task accuracy in the loop
    every: int = 0  # steps between task-accuracy passes; 0 disables
    n: int = 20  # fixed validation examples generated each pass
    max_new_tokens: int = 128  # generation budget per example
    batch_size: int = 8  # prompts per generation batch
    judge_url: str = ""  # Ollama or OpenAI-compatible endpoint for the instruct judge; "" disables
    judge_model: str = "llama3"  # model name sent to the judge endpoint
    judge_timeout_s: float = 60.0  # per-request timeout for the judge
    judge_json: bool = False  # ask for {"score": N} constrained by a JSON schema (Ollama format / llama.cpp response_format)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str = ""  # model preset name; model keys given here override it
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Model presets; tests derive tiny configs from these with dataclasses.replace.
PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             ffn_dim=11008, rope_theta=10000.0, max_seq_len=4096),
    "llama2-13b": ModelConfig(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                              ffn_dim=13824, rope_theta=10000.0, max_seq_len=4096),
    "llama2-70b": ModelConfig(vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              ffn_dim=28672, rope_theta=10000.0, max_seq_len=4096),
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama3.1-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                               ffn_dim=14336, rope_theta=500000.0, max_seq_len=8192,
                               rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 8192}),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                ffn_dim=1536, rope_theta=100000.0, tie_embeddings=True,
                                max_seq_len=8192),
    # A model small enough to train in seconds on a CPU: tests and quick checks.
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                        max_seq_len=512, vocab_multiple=8),
    "small": ModelConfig(vocab_size=1024, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=768,
                         max_seq_len=1024),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Checks `value` against a field type; ints are accepted for floats, strings are parsed
    for overrides given on the command line."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(typ, value, where)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected a bool, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
        ok = (int,) if typ is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok):
            raise ConfigError(f"{where}: expected {'an int' if typ is int else 'a number'}, "
                              f"got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typ is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def from_dict(cls, d: dict, where: str = "config"):
    types_ = _field_types(cls)
    unknown = sorted(set(d) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(types_)}")
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    d[parts[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Reads YAML (if given), applies `key.sub=value` overrides, resolves the preset, validates."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        try:
            value = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            value = v  # not YAML: the text itself (checked against the field's type)
        _set_dotted(raw, k.strip(), value)
    return resolve(raw)


def resolve(raw: dict) -> Config:
    raw = dict(raw)
    preset = raw.get("preset", "") or ""
    model_over = raw.pop("model", None) or {}
    if not isinstance(model_over, dict):
        raise ConfigError("config.model: expected a mapping")
    cfg = from_dict(Config, raw)
    base = to_dict(get_preset(preset)) if preset else {}
    cfg.model = from_dict(ModelConfig, {**base, **model_over}, "config.model")
    validate(cfg)
    return cfg


# The smallest value each count or size may take ("at least"), and the ranges of the rest.
MINIMUM = {"model.vocab_size": 1, "model.dim": 1, "model.n_layers": 1, "model.n_heads": 1,
           "model.n_kv_heads": 1, "model.head_dim": 0, "model.ffn_dim": 1, "model.max_seq_len": 1,
           "model.vocab_multiple": 1, "data.max_length": 2, "data.batch_size": 1, "data.limit": 0,
           "data.train_tokenizer_vocab": 0, "data.worker_count": 0, "data.shards": 0, "optim.warmup_steps": 0,
           "optim.weight_decay": 0.0, "optim.clip_norm": 0.0, "optim.grad_accum": 1,
           "train.steps": 1, "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 0,
           "train.patience": 0, "train.ckpt_every": 0, "train.keep": 1, "train.time_limit_s": 0.0,
           "eval.every": 0, "eval.n": 1, "eval.max_new_tokens": 1, "eval.batch_size": 1}
RANGES = {"optim.min_lr_ratio": (0.0, 1.0), "optim.b1": (0.0, 0.9999999), "optim.b2": (0.0, 0.9999999)}
POSITIVE = ("optim.lr", "optim.eps", "eval.judge_timeout_s")  # finite and > 0


def _check_numbers(cfg: Config) -> None:
    def get(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)
    for key, low in MINIMUM.items():
        if not get(key) >= low:
            raise ConfigError(f"{key}={get(key)!r} must be >= {low}")
    for key, (low, high) in RANGES.items():
        if not low <= get(key) <= high:
            raise ConfigError(f"{key}={get(key)!r} must be between {low} and {high}")
    for key in POSITIVE:
        if not (math.isfinite(get(key)) and get(key) > 0):
            raise ConfigError(f"{key}={get(key)!r} must be a finite number > 0")


def validate(cfg: Config) -> None:
    _check_numbers(cfg)
    m, d = cfg.model, cfg.data
    _choice("model.remat", m.remat, ("none", "full", "dots"))
    _choice("data.padding", d.padding, ("pack", "longest", "max_length"))
    _choice("data.train_on", d.train_on, ("response", "all", "assistant", "last_assistant"))
    _choice("data.chat_format", d.chat_format, ("auto", "openai", "sharegpt"))
    _choice("data.overlong", d.overlong, ("truncate", "drop"))
    _choice("optim.decay", cfg.optim.decay, ("cosine", "linear", "constant"))
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of n_kv_heads={m.n_kv_heads}")
    if not m.head_dim and m.dim % m.n_heads:
        raise ConfigError(f"model.dim={m.dim} must be a multiple of n_heads={m.n_heads} "
                          "(or set model.head_dim)")
    check_batch_split(d.batch_size, grad_accum=cfg.optim.grad_accum)
    if d.shards and d.batch_size % d.shards:
        raise ConfigError(f"data.shards={d.shards} must divide data.batch_size={d.batch_size} "
                          "(each virtual shard serves batch_size / shards rows of every batch)")
    for dt in ("param_dtype", "dtype"):
        _choice(f"model.{dt}", getattr(m, dt), ("float32", "bfloat16", "float16"))


def check_batch_split(batch_size: int, *, grad_accum: int = 1, data_parallel: int = 1,
                      processes: int = 1, names=("data.batch_size", "optim.grad_accum")) -> None:
    """The one rule for splitting data.batch_size: into optim.grad_accum microbatches, each
    split over the data-parallel devices (data * fsdp) and over the processes."""
    batch_name, accum_name = names
    for name, n in ((accum_name, grad_accum), ("data-parallel devices (data*fsdp)",
                    data_parallel), ("processes", processes)):
        if n < 1:
            raise ConfigError(f"{name}={n} must be >= 1")
    parts = grad_accum * data_parallel
    if batch_size % parts or batch_size % processes:
        raise ConfigError(
            f"{batch_name}={batch_size} must be divisible by {accum_name} ({grad_accum}) "
            f"times the data-parallel devices ({data_parallel}), and by the {processes} processes")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}; choose one of: {', '.join(allowed)}")


def at_least(minimum: int):
    """An argparse type: an int >= minimum (a CLI flag gets the same check as a config key)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
        return n
    return parse


def data_root(cfg: Config) -> Path:
    """The data root: the config key, else $JAXFT_DATA, else ../shared/data beside the project."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    if os.environ.get("JAXFT_DATA"):
        return Path(os.environ["JAXFT_DATA"]).expanduser()
    here = Path(__file__).resolve().parent.parent
    return (here.parent / "shared" / "data").resolve()


def data_path(cfg: Config, rel: str) -> Path:
    """Absolute paths and ./paths (the working directory's) as given; others under the root."""
    p = Path(rel).expanduser()
    return p if p.is_absolute() or rel.startswith("./") else data_root(cfg) / p
