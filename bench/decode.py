"""Greedy decode speed: jaxft with the KV cache, jaxft recomputing the whole sequence, and HF
PyTorch `generate` (with and without its cache), on the same random Llama, prompts and token
count, on this machine's CPU.

    .venv/bin/python bench/decode.py                   # SmolLM2-135M shape
    .venv/bin/python bench/decode.py --layers 4 --new-tokens 32   # a quick look

The HF model is random (seeded), saved as safetensors and converted with `jaxft.convert`, so
both frameworks run identical weights. Compile time is reported apart from decode time.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def build_hf(args, path: Path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=args.layers, num_attention_heads=9, num_key_value_heads=3,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def timed(fn, repeat: int = 1):
    """fn's result and its best time of `repeat` calls (this machine is noisy: the best run
    is the one least disturbed, for both frameworks alike)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def hf_rows(hf, prompts, n: int, args):
    """HF `generate` timings as (name, seconds, compile s, rows), and its greedy tokens. With
    more than one prompt, HF also decodes the first prompt alone, last: the batch-1 rate that
    the batch's aggregate is compared with."""
    import torch

    ids = torch.tensor(prompts)

    def gen(x, **kw):
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)

    rows = []
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        theirs, t = timed(lambda: gen(ids, use_cache=True), args.repeat)
        rows.append(("HF PyTorch generate, cache", t, 0.0, len(prompts)))
        if args.draft and len(prompts) == 1:
            looked, t = timed(lambda: gen(ids, prompt_lookup_num_tokens=args.draft), args.repeat)
            rows.append((f"HF generate, cache + {args.draft} lookup drafts", t, 0.0, 1))
            assert looked.tolist() == theirs.tolist(), "HF's drafts changed its greedy tokens"
        if not args.skip_no_cache:
            _, t = timed(lambda: gen(ids, use_cache=False))
            rows.append(("HF PyTorch generate, no cache", t, 0.0, len(prompts)))
        if len(prompts) > 1:
            _, t = timed(lambda: gen(ids[:1], use_cache=True), args.repeat)
            rows.append(("HF PyTorch generate, cache, batch 1", t, 0.0, 1))
    return rows, theirs[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="cached rows: best of this many runs")
    ap.add_argument("--skip-no-cache", action="store_true", help="skip the two slow no-cache rows")
    ap.add_argument("--draft", type=int, default=0, metavar="K",
                    help="also time K prompt-lookup drafts a pass: jaxft's, and HF's "
                    "prompt_lookup_num_tokens (batch 1 only there)")
    args = ap.parse_args()

    import jax
    import torch

    import jaxft
    from jaxft.convert import from_hf
    from jaxft.generate import generate, generate_no_cache

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as d:
        hf = build_hf(args, Path(d) / "hf")
        from_hf(Path(d) / "hf", Path(d) / "jaxft")
        model = jaxft.load(Path(d) / "jaxft").model

    rng = np.random.default_rng(args.seed)
    prompts = [[1] + rng.integers(3, 49152, args.prompt_len - 1).tolist() for _ in range(args.batch)]
    n, b = args.new_tokens, args.batch
    rows = []

    # jaxft with the cache: the first call compiles, the next ones are timed.
    _, t_first = timed(lambda: generate(model, prompts, n))
    ours, t = timed(lambda: generate(model, prompts, n), args.repeat)
    rows.append(("jaxft, KV cache (jit, while_loop)", t, t_first - t, b))
    if args.draft:
        _, t_first = timed(lambda: generate(model, prompts, n, draft=args.draft))
        drafted, t = timed(lambda: generate(model, prompts, n, draft=args.draft), args.repeat)
        rows.append((f"jaxft, KV cache + {args.draft} lookup drafts", t, t_first - t, b))
        assert drafted == ours, "greedy tokens with drafts differ from those without"
    if not args.skip_no_cache:
        _, t_c = timed(lambda: generate_no_cache(model, prompts, 1))  # compiles the forward
        ours_nc, t = timed(lambda: generate_no_cache(model, prompts, n))
        rows.append(("jaxft, no cache (full forward per token)", t, t_c, b))
        assert ours_nc == ours, "cache and no-cache greedy tokens differ"

    hf_timed, theirs = hf_rows(hf, prompts, n, args)
    rows += hf_timed
    agree = [next((i for i, (x, y) in enumerate(zip(a, c)) if x != y), n) for a, c in zip(ours, theirs)]

    n_params = sum(p.numel() for p in hf.parameters())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"model: {args.layers} layers, {n_params / 1e6:.1f}M params, fp32; batch {b}, "
          f"prompt {args.prompt_len} tokens, {n} new tokens, greedy")
    print(f"jaxft and HF agree on the first {min(agree)} of {n} greedy tokens in every row")
    print(f"\n| {'method':<42} | {'decode s':>8} | {'tokens/s':>8} | {'compile s':>9} |")
    print(f"|{'-' * 44}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    for name, t, c, rows_in in rows:
        print(f"| {name:<42} | {t:8.2f} | {rows_in * n / t:8.1f} | {c:9.1f} |")
    if b > 1:  # the batch-b aggregate against HF's one-row rate, measured in this run
        print(f"\njaxft at batch {b}: {b * n / rows[0][1]:.1f} tokens/s = "
              f"{b * rows[-1][1] / rows[0][1]:.1f}x HF's batch-1 rate ({n / rows[-1][1]:.1f} tokens/s)")


if __name__ == "__main__":
    main()
