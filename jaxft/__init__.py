"""jaxft: full-parameter fine-tuning of Llama-family models in JAX.

`jaxft.load(DIR)` gives a model directory's model, tokenizer and config; the CLI is
`python -m jaxft` (`jaxft.__main__`).
"""
from __future__ import annotations

from jaxft.state import Loaded, load

__all__ = ["load", "Loaded"]
