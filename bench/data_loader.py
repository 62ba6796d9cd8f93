"""Loader benchmark on ViGGO train: padding share per mode, and loader speed against a train step.

    .venv/bin/python bench/data_loader.py [--tokenizer DIR] [--vocab 8000] [--batches 300]
        [--chat-tokenizer runs/smollm2/tokenizer]

Trains (or loads) a SentencePiece tokenizer on the training text, encodes every example, then
for padding = max_length, longest and pack reports the share of row slots holding real tokens
and how many examples per second the Grain train loader yields. A tiny Llama train step on
this CPU is timed on packed batches of the same shape to show the loader keeps ahead of it.
With --chat-tokenizer (a dir whose tokenizer has a chat template, e.g. SmolLM2's), it also
renders and tokenises generated 3-exchange conversations with that template and reports
conversations/s, against what the same train step consumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import jax
import numpy as np

from jaxft import batches, data
from jaxft.config import Config, DataConfig, data_path
from jaxft.tasks import read_records
from jaxft.templates import get_template
from jaxft.tokenizer import load_tokenizer, train_sentencepiece

MODES = ("max_length", "longest", "pack")
# DESIGN.md: HF PyTorch full fine-tuning of SmolLM2-135M on this CPU, batch 8, 12.6 s/step.
SMOLLM_EXAMPLES_PER_S = 8 / 12.6


def examples_in(batch: dict) -> int:
    """Examples in a batch: distinct non-zero segment ids per row."""
    seg = batch["segment_ids"]
    return int(sum(len(np.unique(r[r > 0])) for r in seg))


def time_loader(loader, n_batches: int) -> tuple[float, int, float]:
    """(examples/s, examples seen, seconds) over n_batches after one warm-up batch."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        n += examples_in(next(it))
    dt = time.perf_counter() - t0
    return n / dt, n, dt


def time_train_step(cfg: Config, vocab: int, batches: list[dict], steps: int) -> float:
    """Seconds per optimizer step of the `tiny` preset on these batches (after compiling)."""
    from jaxft import sharding, state
    from jaxft.config import get_preset
    from jaxft.config import MeshConfig
    from jaxft.optim import make_optimizer
    from jaxft.step import compile_train_step, to_global

    mcfg = dataclasses.replace(get_preset("tiny"), vocab_size=vocab,
                               max_seq_len=cfg.data.max_length)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    tx = make_optimizer(cfg.optim, steps + 1)
    layout = state.make_layout(mcfg, mesh, tx)
    params = state.init_params(layout, 0)
    opt = state.init_opt(layout, params)
    step = compile_train_step(layout, 1)
    glob = [to_global(b, mesh) for b in batches]
    params, opt, m = step(params, opt, glob[0])  # compile
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        params, opt, m = step(params, opt, glob[i % len(glob)])
    jax.block_until_ready(m["loss"])
    return (time.perf_counter() - t0) / steps


def time_chat(tok_dir: str, n: int, consume_per_s: float) -> None:
    """Conversations rendered (turn by turn, for the mask) and tokenised per second."""
    from jaxft import chat

    tok = load_tokenizer(tok_dir)
    template = chat.get_template("tokenizer", tok=tok)
    convs = [{"messages": [{"role": "system", "content": f"You are assistant number {i}."}]
              + [m for t in range(3) for m in (
                  {"role": "user", "content": f"Question {t}: what does {i} times {t} make?"},
                  {"role": "assistant", "content": f"{i} times {t} makes {i * t}. " * 3})]}
             for i in range(n)]
    template.tokenize(tok, convs[0])  # compile the template once
    t0 = time.perf_counter()
    n_tok = sum(len(template.tokenize(tok, c)["ids"]) for c in convs)
    dt = time.perf_counter() - t0
    print(f"\nchat ({template.origin}): {n} conversations of 3 exchanges, "
          f"{n_tok / n:.0f} tokens each: {n / dt:,.0f} conversations/s "
          f"({n_tok / dt:,.0f} tokens/s)")
    print(f"  the tiny train step consumes {consume_per_s:,.0f} examples/s -> chat loader / "
          f"step = {n / dt / consume_per_s:.1f}x (need >= 10x)")
    print(f"  the SmolLM2 PyTorch step consumes {SMOLLM_EXAMPLES_PER_S:.2f} examples/s -> "
          f"{n / dt / SMOLLM_EXAMPLES_PER_S:,.0f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="", help="tokenizer dir; default: train one")
    ap.add_argument("--vocab", type=int, default=8000, help="SentencePiece size to train")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=300, help="batches timed per mode")
    ap.add_argument("--steps", type=int, default=10, help="train steps timed")
    ap.add_argument("--chat-tokenizer", default="", help="tokenizer dir with a chat template: "
                    "also time conversations/s")
    ap.add_argument("--conversations", type=int, default=500, help="conversations timed")
    args = ap.parse_args()

    cfg = Config(data=DataConfig(template="special-tokens", max_length=args.max_length,
                                 batch_size=args.batch_size))
    records, skipped = read_records("viggo", data_path(cfg, cfg.data.train_file))
    template = get_template(cfg.data.template, include_instruction=cfg.data.include_instruction)
    t0 = time.perf_counter()
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        texts = [t for r in records for t in (r["input"], r["output"])]
        tok = train_sentencepiece(texts, args.vocab, tempfile.mkdtemp(prefix="bench-sp-"))
    t_tok = time.perf_counter() - t0
    tok.add_special_tokens(list(template.special_tokens))
    t0 = time.perf_counter()
    examples, stats = data.encode_records(tok, template, records, cfg.data, skipped)
    t_enc = time.perf_counter() - t0
    lengths = np.array([len(e["ids"]) - 1 for e in examples])

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"ViGGO train: {len(records)} records, {stats.examples} examples, tokenizer "
          f"{len(tok)} ids ({'loaded' if args.tokenizer else 'trained'} in {t_tok:.1f} s)")
    print(f"tokens/example: mean {lengths.mean():.1f}, max {lengths.max()}; target share "
          f"{stats.target_tokens / stats.tokens:.3f}; encode {stats.examples / t_enc:,.0f} ex/s")
    print(f"\nbatch {args.batch_size} x max_length {args.max_length}, {args.batches} batches per mode")
    print(f"{'padding':<11}{'non-pad share':>14}{'ex/row':>8}{'loader ex/s':>13}{'batches/s':>11}")
    rates, pack_batches = {}, []
    for mode in MODES:
        mcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, padding=mode))
        loader = batches.make_loader(mcfg, tok, records, train=True, process_index=0,
                                  process_count=1)
        ratio = loader.stats.padding_ratio
        rate, n, dt = time_loader(loader, args.batches)
        rates[mode] = rate
        rows = args.batches * args.batch_size
        print(f"{mode:<11}{1 - ratio:>14.3f}{n / rows:>8.2f}{rate:>13,.0f}{args.batches / dt:>11.1f}")
        if mode == "pack":
            it = iter(loader)
            pack_batches = [next(it) for _ in range(4)]

    sec = time_train_step(cfg, len(tok), pack_batches, args.steps)
    per_step = np.mean([examples_in(b) for b in pack_batches])
    consume = per_step / sec
    print(f"\ntiny Llama train step (pack, {args.batch_size} x {args.max_length}, "
          f"{per_step:.1f} examples): {sec * 1e3:.0f} ms -> consumes {consume:,.0f} examples/s")
    for mode in MODES:
        verdict = "ok" if rates[mode] >= 10 * consume else "TOO SLOW"
        print(f"  {mode:<11} loader / step = {rates[mode] / consume:7.1f}x  (need >= 10x: {verdict})")
    print(f"  SmolLM2-135M PyTorch step (DESIGN.md, 12.6 s at batch 8) consumes "
          f"{SMOLLM_EXAMPLES_PER_S:.2f} examples/s; pack loader is "
          f"{rates['pack'] / SMOLLM_EXAMPLES_PER_S:,.0f}x that")
    if args.chat_tokenizer:
        time_chat(args.chat_tokenizer, args.conversations, consume)


if __name__ == "__main__":
    main()
