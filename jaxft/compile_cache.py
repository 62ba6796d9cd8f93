"""A persistent XLA compilation cache for the commands users wait on (eval, generate, demo):
the decoder's compiles (0.2-3 s each on a CPU) are reused by the next run of the same shapes.

The directory is $JAXFT_COMPILE_CACHE, else ~/.cache/jaxft/xla; JAXFT_COMPILE_CACHE=off (or
an empty value) leaves jax's cache off.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT = Path("~/.cache/jaxft/xla")


def cache_dir() -> Path | None:
    value = os.environ.get("JAXFT_COMPILE_CACHE")
    if value is None:
        return DEFAULT.expanduser()
    return None if value.strip().lower() in ("", "off", "0", "none") else Path(value).expanduser()


def enable() -> Path | None:
    """Points jax at the cache directory (created if missing); returns it, or None when off.
    Only compiles over 0.1 s are stored: smaller ones are cheaper to redo than to read."""
    d = cache_dir()
    if d is None:
        return None
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d
