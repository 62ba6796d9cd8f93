"""jaxft: full-parameter fine-tuning of Llama-family models in JAX."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["load", "Loaded"]


@dataclass
class Loaded:
    model: Any  # jaxft.model.Llama; model(ids_BxL) -> logits [B, L, V]
    tokenizer: Any  # jaxft.tokenizer.Tokenizer, or None if the dir has none
    config: Any  # jaxft.config.ModelConfig


def load(path: str | os.PathLike, mesh=None) -> Loaded:
    """Loads a jaxft model directory (from `jaxft convert` or a training run's export)."""
    from jaxft import modeldir
    from jaxft.tokenizer import load_tokenizer

    cfg = modeldir.read_config(path)
    model = modeldir.load_model(path, mesh, cfg)
    tok_dir = Path(path) / "tokenizer"
    tok = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return Loaded(model=model, tokenizer=tok, config=cfg)
