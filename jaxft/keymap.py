"""THE key table between HF Llama tensors and jaxft params, and the one layout rule.

Each `TABLE` entry names an HF tensor, the jaxft param it fills, and how many of the jaxft dims
are the matmul input. Every HF linear weight is stored (out, in), every jaxft one (in..., out...),
so one rule covers them all: `jaxft = hf.T.reshape(jaxft_shape)` and back
`hf = jaxft.reshape(hf_shape[::-1]).T`. HF q/k already use the half-rotation rope layout of
`jaxft.model`, so nothing is permuted here; GGUF's permuted q/k are handled by `jaxft.gguf`
(reading) and `jaxft.gguf_export` (writing), which both go through this table under HF names.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import jax
import numpy as np

from jaxft.config import ModelConfig
from jaxft.model import EMBED, LM_HEAD, VOCAB_PARAMS
from jaxft.state import abstract_params


@dataclass(frozen=True)
class Entry:
    hf: str  # HF tensor name; "{i}" marks one tensor per layer, stacked on the jaxft side
    path: tuple[str, ...]  # where it lives in the jaxft params dict
    n_in: int  # leading jaxft dims that are the matmul input; 0: copied as is (norms, rows)


TABLE = (
    Entry("model.embed_tokens.weight", (EMBED,), 0),
    Entry("model.layers.{i}.input_layernorm.weight", ("blocks", "attn_norm", "weight"), 0),
    Entry("model.layers.{i}.self_attn.q_proj.weight", ("blocks", "attn", "wq_DxHxE"), 1),
    Entry("model.layers.{i}.self_attn.k_proj.weight", ("blocks", "attn", "wk_DxKxE"), 1),
    Entry("model.layers.{i}.self_attn.v_proj.weight", ("blocks", "attn", "wv_DxKxE"), 1),
    Entry("model.layers.{i}.self_attn.o_proj.weight", ("blocks", "attn", "wo_HxExD"), 2),
    Entry("model.layers.{i}.post_attention_layernorm.weight", ("blocks", "mlp_norm", "weight"), 0),
    Entry("model.layers.{i}.mlp.gate_proj.weight", ("blocks", "mlp", "w_gate_DxF"), 1),
    Entry("model.layers.{i}.mlp.up_proj.weight", ("blocks", "mlp", "w_up_DxF"), 1),
    Entry("model.layers.{i}.mlp.down_proj.weight", ("blocks", "mlp", "w_down_FxD"), 1),
    Entry("model.norm.weight", ("final_norm", "weight"), 0),
    Entry("lm_head.weight", (LM_HEAD,), 0),
)
# Buffers some old checkpoints saved beside the weights; they are recomputed, never read.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
def jaxft_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every jaxft param by path (stacked ones lead with the layers axis)."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    return {tuple(k.key for k in path): x.shape for path, x in flat}


def hf_names(cfg: ModelConfig) -> list[tuple[str, Entry, int | None]]:
    """(HF name, table entry, layer index or None) for every tensor an HF checkpoint holds."""
    out = []
    for entry in TABLE:
        if entry.path == (LM_HEAD,) and cfg.tie_embeddings:
            continue
        if "{i}" in entry.hf:
            out += [(entry.hf.format(i=i), entry, i) for i in range(cfg.n_layers)]
        else:
            out.append((entry.hf, entry, None))
    return out


def hf_shape(entry: Entry, cfg: ModelConfig, shapes: dict) -> tuple[int, ...]:
    """The HF shape of a table entry; `shapes` is `jaxft_shapes(cfg)`."""
    js = shapes[entry.path][1 if "{i}" in entry.hf else 0:]
    if entry.path[0] in VOCAB_PARAMS:
        return (cfg.vocab_size, cfg.dim)  # jaxft pads rows up to padded_vocab
    if entry.n_in == 0:
        return js
    return (math.prod(js[entry.n_in:]), math.prod(js[:entry.n_in]))


def to_jaxft(w: np.ndarray, entry: Entry, js: tuple[int, ...]) -> np.ndarray:
    return w if entry.n_in == 0 else w.T.reshape(js)


def to_hf(w: np.ndarray, entry: Entry, hs: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(w[: hs[0]] if entry.n_in == 0 else w.reshape(hs[::-1]).T)
