"""One epoch of ViGGO train: jaxft packing against the peers' padded batches (HF PyTorch).

    .venv/bin/python bench/epoch_time.py [--steps 6] [--vocab 4000] [--dim 256 --layers 4]

Every way trains the same small Llama (random init) on the same examples: the special-token
template, SentencePiece tokens (trained here on the training text), prompt masked, padding
never in the loss, AdamW, batch 8, clip 1. The ways of batching:

    jaxft pack        jaxft.make_loader(padding=pack): 8 rows of max_length, first-fit
    torch longest     LLMs-from-scratch ch07 collate: each batch padded to its longest example
    torch 512         the Ray Llama-2 recipe: every example padded to 512 tokens

Each way times `--steps` steps (after two warm-up steps; torch takes the first batches of a
shuffled epoch, jaxft its loader's batches, loader time included) and the epoch time is
extrapolated: mean step time x the number of batches one epoch has (counted, not timed).
Useful tokens are the non-padding input tokens of the epoch, the same for every way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time

import numpy as np

from jaxft import data
from jaxft.batches import make_loader
from jaxft.config import Config, DataConfig, ModelConfig, OptimConfig, data_path
from jaxft.tasks import read_records
from jaxft.templates import get_template
from jaxft.tokenizer import train_sentencepiece

IGNORE = -100  # torch cross_entropy's ignore_index, as in ch07


def padded_batches(examples: list[dict], batch: int, width: int | None, pad_id: int, seed: int):
    """Peer batches over one shuffled epoch: (inputs, targets) int64 [batch, w], w = `width` or
    the batch's longest example; padding and masked prompt tokens are IGNORE in targets."""
    order = np.random.default_rng(seed).permutation(len(examples))
    out = []
    for i in range(0, len(order), batch):
        exs = [examples[j] for j in order[i:i + batch]]
        w = width or max(len(e["ids"]) - 1 for e in exs)
        inp = np.full((len(exs), w), pad_id, np.int64)
        tgt = np.full((len(exs), w), IGNORE, np.int64)
        for r, e in enumerate(exs):
            n = len(e["ids"]) - 1
            inp[r, :n] = e["ids"][:-1]
            tgt[r, :n] = np.where(e["mask"][1:] > 0, e["ids"][1:], IGNORE)
        out.append((inp, tgt))
    return out


def torch_step_time(mcfg: ModelConfig, batches, steps: int, lr: float) -> float:
    """Mean seconds per HF PyTorch step over the first `steps` batches after two warm-ups."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.dim, intermediate_size=mcfg.ffn_dim,
        num_hidden_layers=mcfg.n_layers, num_attention_heads=mcfg.n_heads,
        num_key_value_heads=mcfg.n_kv_heads, max_position_embeddings=mcfg.max_seq_len,
        attn_implementation="sdpa")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(inp, tgt):
        # Right padding needs no attention mask under causal attention (ch07 passes none).
        logits = model(torch.from_numpy(inp)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(tgt).flatten(),
                                                 ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for b in batches[-2:]:
        step(*b)
    t0 = time.perf_counter()
    for b in batches[:steps]:
        step(*b)
    return (time.perf_counter() - t0) / steps


def jax_step_time(cfg: Config, mcfg: ModelConfig, tok, records, steps: int) -> float:
    """Mean seconds per jaxft step (loader, transfer and step) after two warm-up steps."""
    import jax
    from jaxft import sharding, state
    from jaxft.config import MeshConfig
    from jaxft.optim import make_optimizer
    from jaxft.step import compile_train_step, to_global

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    layout = state.make_layout(mcfg, mesh, make_optimizer(cfg.optim, 1000))
    params = state.init_params(layout, 0)
    opt = state.init_opt(layout, params)
    step = compile_train_step(layout, 1)
    it = iter(make_loader(cfg, tok, records, train=True, process_index=0, process_count=1))
    for _ in range(2):
        params, opt, m = step(params, opt, to_global(next(it), mesh))
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt, m = step(params, opt, to_global(next(it), mesh))
        float(m["loss"])  # the trainer reads the loss every step too
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per way")
    ap.add_argument("--vocab", type=int, default=4000, help="SentencePiece pieces to train")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()

    import jax
    import torch
    torch.set_num_threads(args.threads)
    cfg = Config(data=DataConfig(template="special-tokens", max_length=args.max_length,
                                 batch_size=args.batch, padding="pack"),
                 optim=OptimConfig(lr=1e-4, warmup_steps=0, decay="constant", weight_decay=0.0))
    records, skipped = read_records("viggo", data_path(cfg, cfg.data.train_file))
    texts = [t for r in records for t in (r["input"], r["output"])]
    tok = train_sentencepiece(texts, args.vocab, tempfile.mkdtemp(prefix="bench-epoch-sp-"))
    template = get_template(cfg.data.template, include_instruction=cfg.data.include_instruction)
    tok.add_special_tokens(list(template.special_tokens))
    examples, stats = data.encode_records(tok, template, records, cfg.data, skipped)
    mcfg = ModelConfig(vocab_size=len(tok), dim=args.dim, n_layers=args.layers,
                       n_heads=args.dim // 64, n_kv_heads=args.dim // 64, ffn_dim=3 * args.dim,
                       max_seq_len=args.max_length)
    useful = stats.tokens  # non-padding input tokens in one epoch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.device_count()} "
          f"device), torch {torch.__version__} ({args.threads} threads); "
          f"{time.strftime('%Y-%m-%d %H:%M')}; load {os.getloadavg()[0]:.2f}")
    print(f"ViGGO train: {stats.examples} examples, {useful:,} input tokens (mean "
          f"{useful / stats.examples:.1f}), {stats.target_tokens:,} in the loss; vocab {len(tok)}; "
          f"model dim {args.dim} x {args.layers} layers; batch {args.batch}")

    rows = []
    loader = make_loader(cfg, tok, records, train=True, process_index=0, process_count=1)
    pad = loader.stats.padding_ratio  # measured over one shuffled epoch
    n_batches = int(np.ceil(useful / (1 - pad) / args.max_length / args.batch))
    rows.append(("jaxft pack", n_batches, pad, jax_step_time(cfg, mcfg, tok, records, args.steps)))
    for name, width in (("torch longest", None), (f"torch {args.max_length}", args.max_length)):
        batches = padded_batches(examples, args.batch, width, tok.pad_id, cfg.data.seed)
        slots = sum(b[0].size for b in batches)
        rows.append((name, len(batches), 1 - useful / slots,
                     torch_step_time(mcfg, batches, args.steps, cfg.optim.lr)))

    print(f"\n{args.steps} timed steps per way; epoch time = mean step time x batches per epoch "
          f"(extrapolated); load now {os.getloadavg()[0]:.2f}")
    print(f"{'way':<15}{'batches':>9}{'padding':>9}{'s/step':>9}{'epoch s':>10}{'useful tok/s':>14}"
          f"{'jaxft speed-up':>16}")
    base = rows[0][1] * rows[0][3]
    for name, nb, padding, sec in rows:
        epoch = nb * sec
        print(f"{name:<15}{nb:>9}{padding:>9.1%}{sec:>9.3f}{epoch:>10.0f}{useful / epoch:>14,.0f}"
              f"{epoch / base:>15.2f}x")


if __name__ == "__main__":
    main()
