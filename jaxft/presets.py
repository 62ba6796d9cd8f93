"""Model presets. Tests derive tiny configs from these with dataclasses.replace."""
from __future__ import annotations

from jaxft.config import ConfigError, ModelConfig

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


def get(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
