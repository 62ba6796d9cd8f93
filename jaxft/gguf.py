"""Reading a llama.cpp GGUF Llama file, for `jaxft convert --from-gguf` (`convert.from_gguf`).

Tensors are dequantised to float32 one at a time with the `gguf` package (numpy only) and
renamed to their HF names, so `jaxft.convert`'s key table does the rest; the hparams come out
as an HF config.json dict. llama.cpp stores q/k
rows permuted for interleaved rope; `unpermute` puts them back in the half-rotation layout
that HF and `jaxft.model` use. The tokenizer (byte-level BPE, `tokenizer.ggml.model = gpt2`)
is rebuilt as an HF tokenizer.json + tokenizer_config.json from the file's metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from jaxft.errors import ConvertError

# GGUF tensor name -> HF name ("{i}": layer index)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types that are added (special) tokens


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        return NAMES[key].format(i=parts[1]) if key in NAMES else None
    return NAMES.get(gguf_name)


def unpermute(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row order: per head it interleaves the two rope halves."""
    o = w_OxI.shape[0]
    return (w_OxI.reshape(n_heads, o // n_heads // 2, 2, *w_OxI.shape[1:])
            .swapaxes(1, 2).reshape(w_OxI.shape))


class GGUFWeights:
    """HF-named float32 tensors of a GGUF file, dequantised one at a time."""

    def __init__(self, reader, path: Path, n_heads: int, n_kv_heads: int):
        self.tensors = {t.name: t for t in reader.tensors}
        self.where = {}
        for name in self.tensors:
            hf = hf_name(name)
            self.where[hf or name] = name  # unknown names stay as they are: reported unexpected
        self.heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
        self.path = path

    def get(self, name: str) -> np.ndarray:
        t = self.tensors[self.where[name]]
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        kind = name.split(".")[-2]
        return unpermute(w, self.heads[kind]) if kind in self.heads else w


def _field(reader, key: str, default=None, where: str = ""):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ConvertError(f"{where}: metadata field {key!r} is missing")
        return default
    return f.contents()


def config_from_gguf(reader, path: Path) -> dict:
    """The file's llama.* metadata as an HF config.json dict."""
    arch = _field(reader, "general.architecture", where=str(path))
    if arch != "llama":
        raise ConvertError(f"{path}: architecture {arch!r} is not llama")
    get = lambda k, d=None: _field(reader, f"llama.{k}", d, str(path))  # noqa: E731
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    return {"model_type": "llama", "vocab_size": get("vocab_size", len(reader.fields["tokenizer.ggml.tokens"].data)),
            "hidden_size": get("embedding_length"), "num_hidden_layers": get("block_count"),
            "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv", heads),
            "head_dim": get("attention.key_length", get("embedding_length") // heads),
            "intermediate_size": get("feed_forward_length"),
            "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
            "rope_theta": get("rope.freq_base", 10000.0),
            "max_position_embeddings": get("context_length", 4096),
            "tie_word_embeddings": "output.weight" not in names}


def tokenizer_files(reader, path: Path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json (text) for a byte-level BPE GGUF vocabulary."""
    model = _field(reader, "tokenizer.ggml.model", where=str(path))
    if model != "gpt2":
        raise ConvertError(f"{path}: tokenizer model {model!r} is not supported (only gpt2 BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens", where=str(path))
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = _field(reader, "tokenizer.ggml.merges", where=str(path))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
           "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
           "decoder": {**byte_level, "add_prefix_space": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None,
                     "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                     "vocab": {t: i for i, t in enumerate(tokens)},
                     "merges": [m.split(" ", 1) for m in merges]}}
    special = lambda key: (tokens[i] if (i := _field(reader, f"tokenizer.ggml.{key}_token_id", -1)) >= 0  # noqa: E731
                           else None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": special("bos"),
              "eos_token": special("eos"), "pad_token": special("padding"),
              "unk_token": special("unknown"),
              "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
              "clean_up_tokenization_spaces": False,
              "chat_template": _field(reader, "tokenizer.chat_template", "") or None}
    return {"tokenizer.json": json.dumps(tok, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
