"""`jaxft convert --to-gguf`: a jaxft model directory to one llama.cpp GGUF file (arch `llama`).

The inverse of `jaxft.gguf`: the HF names of `jaxft.convert`'s key table are renamed to GGUF
names, q/k rows get llama.cpp's interleaved-rope order back (`permute`), and the tokenizer
(SentencePiece `tokenizer.model` or byte-level BPE `tokenizer.json`) becomes `tokenizer.ggml.*`
metadata. Tensors stream one layer slice at a time straight from the Orbax checkpoint through
`GGUFWriter`'s tensor-info-first API, so the host holds one tensor and its converted copy, never
the model. The file is written beside `out` and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorstore as ts
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quantize
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from jaxft.config import ModelConfig
from jaxft.errors import ConvertError
from jaxft.keymap import Entry, hf_names, hf_shape, jaxft_shapes, to_hf
from jaxft.gguf import NAMES
from jaxft.model import rope_inv_freq
from jaxft.modeldir import check_output, read_config
from jaxft.tokenizer import HFTokenizer, SentencePieceTokenizer

# --type -> (GGML type of 2-D weights, general.file_type); 1-D norms always stay F32, as
# llama.cpp's own converter keeps them.
TYPES = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
         "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
         "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
         "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0)}
GGUF_NAME = {hf: g for g, hf in NAMES.items()}  # HF name template -> GGUF name template
Q8_BLOCK, Q8_BYTES = 32, 34  # Q8_0: 32 weights in one fp16 scale + 32 int8


def permute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rope halves per head); `jaxft.gguf.unpermute` undone."""
    o = w_OxI.shape[0]
    return (w_OxI.reshape(n_heads, 2, o // n_heads // 2, *w_OxI.shape[1:])
            .swapaxes(1, 2).reshape(w_OxI.shape))


@dataclass(frozen=True)
class Spec:
    """One GGUF tensor: where it comes from and what it is written as."""
    name: str  # GGUF name
    hf: str  # HF name, or "" for tensors computed here (rope_freqs)
    entry: Entry | None
    layer: int | None
    shape: tuple[int, ...]  # numpy (HF) order; GGUF stores it reversed
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        if self.qtype == GGMLQuantizationType.Q8_0:
            return n // Q8_BLOCK * Q8_BYTES
        return n * (4 if self.qtype == GGMLQuantizationType.F32 else 2)


def tensor_specs(cfg: ModelConfig, kind: str) -> list[Spec]:
    """Every tensor of the GGUF file, in file order, without reading any weights."""
    want, _ = TYPES[kind]
    shapes, specs = jaxft_shapes(cfg), []
    if cfg.rope_scaling:  # Llama-3 scaling travels as per-frequency divisors
        specs.append(Spec("rope_freqs.weight", "", None, None, (cfg.head_size // 2,),
                          GGMLQuantizationType.F32))
    for name, entry, layer in hf_names(cfg):
        shape = hf_shape(entry, cfg, shapes)
        template = name if layer is None else entry.hf
        gname = GGUF_NAME[template].format(i=layer)
        qtype = want if len(shape) == 2 else GGMLQuantizationType.F32
        if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % Q8_BLOCK:
            qtype = GGMLQuantizationType.F16  # rows Q8_0 cannot block, as llama.cpp falls back
        specs.append(Spec(gname, name, entry, layer, shape, qtype))
    return specs


def rope_freq_factors(cfg: ModelConfig) -> np.ndarray:
    """What llama.cpp divides each rope frequency by: plain / scaled, from jaxft's own table."""
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (plain / rope_inv_freq(cfg)).astype(np.float32)


class ParamReader:
    """Reads one param of a model dir's Orbax checkpoint at a time, then serves its layers.

    Orbax writes each param as one zstd-compressed zarr chunk inside an OCDBT store. Opening
    that array with tensorstore (Orbax's own storage layer) reads one param without restoring
    the tree; a chunk decodes whole, so the param last read is kept for its next layer."""

    def __init__(self, model_dir: Path):
        if not (model_dir / "params").is_dir():
            raise ConvertError(f"{model_dir}: params/ is missing (not a jaxft model directory)")
        self.base = f"file://{(model_dir / 'params').absolute()}/"
        self._key, self._value = "", None

    def read(self, path: tuple[str, ...], layer: int | None) -> np.ndarray:
        key = ".".join(path)
        if key != self._key:
            self._key, self._value = key, None  # drop the previous param before reading
            spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": self.base,
                                                  "path": key + "/"}}
            try:
                self._value = ts.open(spec, open=True).result().read().result()
            except ValueError as e:
                raise ConvertError(f"{self.base}: param {key} cannot be read ({e})") from None
        return self._value if layer is None else self._value[layer]


def encode_tensor(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The tensor as the bytes llama.cpp reads for `qtype` (F32 and F16 as plain arrays)."""
    w = w.astype(np.float32, copy=False)
    if qtype == GGMLQuantizationType.F32:
        return w
    if qtype == GGMLQuantizationType.F16:
        return w.astype(np.float16)
    return quantize(w, qtype)


def gguf_tensor(reader: ParamReader, cfg: ModelConfig, spec: Spec, shapes: dict) -> np.ndarray:
    """One tensor in its HF layout (q/k permuted for llama.cpp), encoded for the file."""
    if spec.entry is None:
        return rope_freq_factors(cfg)
    w = to_hf(reader.read(spec.entry.path, spec.layer), spec.entry, hf_shape(spec.entry, cfg, shapes))
    kind = spec.hf.split(".")[-2]
    if kind in ("q_proj", "k_proj"):
        w = permute(w, cfg.n_heads if kind == "q_proj" else cfg.n_kv_heads)
    if w.shape != spec.shape:
        raise ConvertError(f"param for {spec.hf} has shape {list(w.shape)}, expected {list(spec.shape)}")
    return encode_tensor(w, spec.qtype)


def add_hparams(w: GGUFWriter, cfg: ModelConfig, kind: str, name: str) -> None:
    """Every llama.* key llama.cpp's llama loader reads."""
    w.add_name(name)
    w.add_file_type(int(TYPES[kind][1]))
    if kind == "q8_0":
        w.add_quantization_version(2)
    w.add_vocab_size(cfg.vocab_size)  # the real rows, not jaxft's padded ones
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_block_count(cfg.n_layers)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)


# ---------------------------------------------------------------- tokenizer


def _tokenizer_config(tok_dir: Path) -> dict:
    p = tok_dir / "tokenizer_config.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError as e:
        raise ConvertError(f"{p}: not valid JSON (line {e.lineno}): {e.msg}") from None


def chat_template(tok_dir: Path, config: dict) -> str | None:
    """The chat template from tokenizer_config.json or chat_template.jinja, if any."""
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: take the default one
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if not t and (tok_dir / "chat_template.jinja").is_file():
        t = (tok_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return t or None


def sentencepiece_vocab(tok_dir: Path) -> dict:
    """tokenizer.ggml.* for a SentencePiece (Llama-2) model: llama.cpp's "llama" vocab."""
    raw = (tok_dir / "tokenizer.model").read_bytes()
    proto, tok = sp_pb.ModelProto.FromString(raw), SentencePieceTokenizer(raw)
    # SentencePiece's piece types use llama.cpp's token type numbers (NORMAL=1 ... BYTE=6).
    unk = next((i for i, p in enumerate(proto.pieces) if p.type == TokenType.UNKNOWN), None)
    return {"model": "llama", "pre": None, "tokens": [p.piece for p in proto.pieces],
            "scores": [p.score for p in proto.pieces], "types": [int(p.type) for p in proto.pieces],
            "merges": None, "bos": tok.bos_id, "eos": tok.eos_id, "unk": unk, "pad": tok.pad_id,
            "add_bos": tok.bos_id is not None,
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
            "remove_extra_whitespaces": proto.normalizer_spec.remove_extra_whitespaces}


LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
                "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def bpe_pre(pre: dict | None, where: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer (it has the regexes built in)."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [(s or {}).get("type") for s in steps]
    if any((s or {}).get("add_prefix_space") for s in steps):
        raise ConvertError(f"{where}: ByteLevel add_prefix_space=true (a space before every text "
                           "piece) has no llama.cpp equivalent")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise ConvertError(f"{where}: pre-tokenizer {kinds} has no llama.cpp equivalent "
                       "(supported: GPT-2 ByteLevel, SmolLM digits + ByteLevel, Llama-3 split)")


def bpe_vocab(tok_dir: Path, config: dict) -> dict:
    """tokenizer.ggml.* for a byte-level BPE tokenizer.json: llama.cpp's "gpt2" vocab."""
    path = tok_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConvertError(f"{path}: model type {model.get('type')!r} is not BPE")
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added, -1]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(size)], [int(TokenType.UNUSED)] * size
    for t, i in model["vocab"].items():
        tokens[i], types[i] = t, int(TokenType.NORMAL)
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    tok = HFTokenizer.from_file(path)
    ids = {t: i for i, t in enumerate(tokens)}

    def named(key: str) -> int | None:  # a special token given by content in the config
        c = config.get(key)
        return ids.get(c.get("content") if isinstance(c, dict) else c)
    return {"model": "gpt2", "pre": bpe_pre(data.get("pre_tokenizer"), path), "tokens": tokens,
            "scores": None, "types": types,
            "merges": [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
            "bos": tok.bos_id if tok.bos_id is not None else named("bos_token"), "eos": tok.eos_id,
            "unk": named("unk_token"), "pad": tok.pad_id, "add_bos": tok.bos_id is not None,
            "add_space_prefix": None, "remove_extra_whitespaces": None}


def read_vocab(tok_dir: Path, n_vocab: int) -> dict:
    """The model dir's tokenizer as GGUF fields, padded with unused tokens to the model's rows."""
    if (tok_dir / "tokenizer.model").is_file():
        v = sentencepiece_vocab(tok_dir)
    elif (tok_dir / "tokenizer.json").is_file():
        v = bpe_vocab(tok_dir, _tokenizer_config(tok_dir))
    else:
        raise ConvertError(f"{tok_dir}: no tokenizer.model or tokenizer.json (GGUF needs the tokenizer)")
    if len(v["tokens"]) > n_vocab:
        raise ConvertError(f"{tok_dir}: tokenizer has {len(v['tokens'])} tokens, more than the "
                           f"model's {n_vocab} embedding rows")
    extra = n_vocab - len(v["tokens"])  # rows no token uses (a vocab rounded up in training)
    v["tokens"] += [f"[PAD{i}]" for i in range(len(v["tokens"]), n_vocab)]
    v["types"] += [int(TokenType.UNUSED)] * extra
    if v["scores"] is not None:
        v["scores"] += [0.0] * extra
    v["chat_template"] = chat_template(tok_dir, _tokenizer_config(tok_dir))
    return v


def add_vocab(w: GGUFWriter, v: dict) -> None:
    w.add_tokenizer_model(v["model"])
    if v["pre"]:
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    if v["scores"] is not None:
        w.add_token_scores(v["scores"])
    w.add_token_types(v["types"])
    if v["merges"] is not None:
        w.add_token_merges(v["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if v[key] is not None:
            add(v[key])
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(False)  # jaxft's templates place EOS themselves
    if v["add_space_prefix"] is not None:
        w.add_add_space_prefix(v["add_space_prefix"])
        w.add_remove_extra_whitespaces(v["remove_extra_whitespaces"])
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])


# ---------------------------------------------------------------- Ollama


def modelfile(gguf_name: str, v: dict) -> str:
    """An Ollama Modelfile for the export: FROM, a TEMPLATE when the chat template is one
    Ollama's syntax can state (ChatML, Llama-3), and a stop per end token."""
    eos = v["tokens"][v["eos"]]
    lines = [f"FROM ./{gguf_name}"]
    t = v["chat_template"] or ""
    if "<|im_start|>" in t:
        lines.append('TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n'
                     '{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"""')
        stops = ["<|im_end|>", eos]
    elif "<|start_header_id|>" in t:
        lines.append('TEMPLATE """{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n'
                     '{{ .System }}<|eot_id|>{{ end }}<|start_header_id|>user<|end_header_id|>\n\n'
                     '{{ .Prompt }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"""')
        stops = ["<|eot_id|>", eos]
    else:  # no chat template: the prompt goes in as raw text
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        stops = [eos]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- export


def write_gguf(path: Path, cfg: ModelConfig, vocab: dict, reader: ParamReader, kind: str,
               name: str) -> None:
    """Writes the header and metadata, then each tensor as it is read and converted."""
    specs, shapes = tensor_specs(cfg, kind), jaxft_shapes(cfg)
    w = GGUFWriter(path, "llama")
    try:
        add_hparams(w, cfg, kind, name)
        add_vocab(w, vocab)
        for s in specs:
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes, raw_dtype=s.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s in specs:
            w.write_tensor_data(gguf_tensor(reader, cfg, s, shapes))
    finally:
        w.close()


def to_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, kind: str = "f32",
            force: bool = False) -> Path:
    """Exports a jaxft model directory as a llama.cpp GGUF file, plus an Ollama Modelfile
    beside it (`out` with suffix .Modelfile)."""
    model_dir, out = Path(model_dir), Path(out)
    if kind not in TYPES:
        raise ConvertError(f"--type {kind!r}: expected one of {', '.join(TYPES)}")
    mf = out.with_suffix(".Modelfile")
    check_output(out, force)  # before any tensor is converted
    check_output(mf, force)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such jaxft model directory")
    cfg = read_config(model_dir)
    vocab = read_vocab(model_dir / "tokenizer", cfg.vocab_size)
    reader = ParamReader(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    try:
        write_gguf(Path(tmp), cfg, vocab, reader, kind, model_dir.resolve().name)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mf.write_text(modelfile(out.name, vocab), encoding="utf-8")
    return out
