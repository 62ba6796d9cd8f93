"""Train-step speed: jaxft against HF PyTorch `LlamaForCausalLM` + `torch.optim.AdamW` (fp32).

    .venv/bin/python bench/train_step.py                       # all three configs
    .venv/bin/python bench/train_step.py --configs d256 --reps 3
    .venv/bin/python bench/train_step.py --configs d512 --pieces   # where the time goes

Both frameworks start from the same weights (a seeded HF model converted with
`jaxft.convert`), see the same token batches, clip gradients at global norm 1 and take one
AdamW step per batch. Timing is interleaved, jaxft then torch, `--reps` times; each rep times
`--steps` steps after warm-up, and the table shows the median per-step time. Run it without
XLA_FLAGS: one device (simulated devices on two cores cost ~20%).

Each rep runs one untimed step per framework before its timed ones. On a VM with free page
reporting (a virtio balloon; this dev machine's Firecracker guest has it), memory a process
frees is handed back to the host after ~2 s, and the next allocation re-faults it from the
host: the first step after the other framework's multi-second turn pays for that (jaxft's
SmolLM2 step, whose ~2.8 GB temp buffer is mapped afresh each execution, 6.3 -> 7.0-7.8 s; the
same after a 6 s sleep), while a training loop's back-to-back steps never do. The untimed step
puts both at their steady training pace; its time is still printed.

Both frameworks page-fault on fresh allocations every step (jaxft's XLA temp buffer is one
~2.8 GB mmap for the SmolLM2 shape, refaulted 4 KiB at a time), and how much torch's glibc heap
happens to reuse depends on what ran before in the process. For steady figures run with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (transparent huge pages for malloc's large blocks):
both sides get faster and the ratio stops drifting; the header line records the setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxft.config import ModelConfig, get_preset

# name -> (model config, batch, sequence length). Llama-2's 32000-token vocab for the first two.
CONFIGS = {
    "d256": (ModelConfig(vocab_size=32000, dim=256, n_layers=4, n_heads=4, n_kv_heads=4,
                         ffn_dim=768, max_seq_len=512), 8, 256),
    "d512": (ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=8,
                         ffn_dim=1536, max_seq_len=1024), 4, 512),
    "smollm2": (get_preset("smollm2-135m"), 4, 256),
}


def hf_model(cfg: ModelConfig, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa")).train()


class Torch:
    """ch07-style step: logits, cross-entropy over every position, backward, clip, AdamW."""

    def __init__(self, model, lr: float):
        import torch
        self.torch, self.model = torch, model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def step(self, inputs_BxL: np.ndarray, targets_BxL: np.ndarray) -> float:
        torch = self.torch
        logits = self.model(torch.from_numpy(inputs_BxL)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 torch.from_numpy(targets_BxL).flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()


class Jax:
    """jaxft's own compiled train step on a one-device mesh, params loaded from `model_dir`
    (None: random params, for profiling)."""

    def __init__(self, cfg: ModelConfig, model_dir: Path | None, lr: float):
        import jax
        from jaxft import sharding, state
        from jaxft.config import MeshConfig, OptimConfig
        from jaxft.optim import make_optimizer
        from jaxft.step import compile_train_step

        self.jax = jax
        self.mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
        tx = make_optimizer(OptimConfig(lr=lr, warmup_steps=0, decay="constant", clip_norm=1.0,
                                        weight_decay=0.0), 1000)
        self.layout = layout = state.make_layout(cfg, self.mesh, tx)
        self.params = (state.init_params(layout, 0) if model_dir is None else
                       state.pretrained_params(str(model_dir), cfg, self.mesh, layout.params_sh))
        self.opt = state.init_opt(layout, self.params)
        self.fn = compile_train_step(layout, 1)

    def step(self, batch: dict) -> float:
        self.params, self.opt, m = self.fn(self.params, self.opt, batch)
        return float(m["loss"])  # waits for the step, as the torch side does


def make_batches(cfg: ModelConfig, b: int, l: int, n: int, seed: int) -> list[np.ndarray]:
    """n full rows of random ids, [b, l + 1] each: no padding, every position a target."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32) for _ in range(n)]


def jax_batch(ids: np.ndarray, mesh) -> dict:
    from jaxft.step import to_global
    b, l1 = ids.shape
    l = l1 - 1
    return to_global({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                      "loss_mask": np.ones((b, l), np.int32), "segment_ids": np.ones((b, l), np.int32),
                      "positions": np.broadcast_to(np.arange(l, dtype=np.int32), (b, l))}, mesh)


def timed_steps(step, batches, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    return (time.perf_counter() - t0) / n


def run_config(name: str, args) -> dict:
    import torch
    from jaxft.convert import from_hf
    from jaxft.step import flops_per_token, peak_flops

    cfg, b, l = CONFIGS[name]
    with tempfile.TemporaryDirectory(prefix=f"bench-step-{name}-") as d:  # ~1 GB for SmolLM2
        hf = hf_model(cfg, args.seed)
        hf.save_pretrained(Path(d) / "hf", safe_serialization=True)
        from_hf(Path(d) / "hf", Path(d) / "jx")
        jx = Jax(cfg, Path(d) / "jx", args.lr)
    th = Torch(hf, args.lr)

    ids = make_batches(cfg, b, l, 2, args.seed)
    jb = [jax_batch(x, jx.mesh) for x in ids]
    tb = [(x[:, :-1].astype(np.int64), x[:, 1:].astype(np.int64)) for x in ids]
    t0 = time.perf_counter()
    loss_j = jx.step(jb[0])  # compiles
    compile_s = time.perf_counter() - t0
    loss_t = th.step(*tb[0])
    print(f"{name}: first-step loss jaxft {loss_j:.5f} torch {loss_t:.5f} "
          f"(same weights and tokens); jaxft compile+step {compile_s:.1f} s", flush=True)
    if abs(loss_j - loss_t) > 1e-3 * max(1.0, abs(loss_t)):
        raise SystemExit(f"{name}: the two frameworks disagree on the loss; not comparable")
    jx.step(jb[1]), th.step(*tb[1])  # warm-up: allocator, thread pools
    tj, tt = [], []
    for r in range(args.reps):
        # One untimed step after each switch (see the module docstring), its time shown apart.
        cj = timed_steps(jx.step, jb, 1)
        tj.append(timed_steps(jx.step, jb, args.steps))
        ct = timed_steps(lambda x: th.step(*x), tb, 1)
        tt.append(timed_steps(lambda x: th.step(*x), tb, args.steps))
        print(f"  rep {r}: jaxft {tj[-1] * 1e3:8.1f} ms  torch {tt[-1] * 1e3:8.1f} ms "
              f"(first step after the switch: jaxft {cj * 1e3:.0f}, torch {ct * 1e3:.0f}; "
              f"load {os.getloadavg()[0]:.2f})", flush=True)
    mj, mt = float(np.median(tj)), float(np.median(tt))
    fpt = flops_per_token(cfg, l)
    return {"name": name, "b": b, "l": l, "params_m": sum(p.numel() for p in hf.parameters()) / 1e6,
            "jax_s": mj, "torch_s": mt, "jax_tok_s": b * l / mj, "torch_tok_s": b * l / mt,
            "jax_mfu": fpt * b * l / mj / peak_flops(), "torch_mfu": fpt * b * l / mt / peak_flops(),
            "torch_threads": torch.get_num_threads()}


def _best(fn, n: int) -> float:
    """Fastest of n timed calls after one warm-up call; fn must block until done."""
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def pieces(name: str, n: int) -> list[tuple[str, float, float]]:
    """Where a step's time goes: (piece, jaxft s, torch s), each piece timed on its own."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from jaxft.loss import batch_loss_sum, head_loss_sum
    from jaxft.model import CausalSegments, attention

    cfg, b, l = CONFIGS[name]
    from jaxft.convert import from_hf
    with tempfile.TemporaryDirectory(prefix=f"bench-pieces-{name}-") as d:
        hf = hf_model(cfg, 0)
        hf.save_pretrained(Path(d) / "hf", safe_serialization=True)
        from_hf(Path(d) / "hf", Path(d) / "jx")
        jx, th = Jax(cfg, Path(d) / "jx", 1e-4), Torch(hf, 1e-4)
    ids = make_batches(cfg, b, l, 1, 0)[0]
    batch = jax_batch(ids, jx.mesh)
    inp, tgt = torch.from_numpy(ids[:, :-1].astype(np.int64)), torch.from_numpy(ids[:, 1:].astype(np.int64))
    rows = []

    gdef, tx = jx.layout.graphdef, jx.layout.tx
    grad = jax.jit(jax.grad(lambda p, bt: batch_loss_sum(nnx.merge(gdef, p), bt)[0]))
    g = grad(jx.params, batch)

    def t_fb():
        logits = hf(inp).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
    rows.append(("forward+backward", _best(lambda: jax.block_until_ready(grad(jx.params, batch)), n),
                 _best(t_fb, n)))

    upd = jax.jit(lambda g, o, p: tx.update(g, o, p))
    t_opt = _best(lambda: jax.block_until_ready(upd(g, jx.opt, jx.params)), n)

    def t_topt():
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        th.opt.step()
    rows.append(("clip + AdamW", t_opt, _best(t_topt, n)))

    h, k, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
    r = np.random.default_rng(0)
    q_, k_, v_ = (jnp.asarray(r.standard_normal((b, l, hh, e)), jnp.float32) for hh in (h, k, k))
    seg = CausalSegments(jnp.ones((b, l), jnp.int32))
    ga = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, seg) ** 2), argnums=(0, 1, 2)))
    tq, tk, tv = (torch.randn(b, hh, l, e, requires_grad=True) for hh in (h, k, k))

    def t_att():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                             enable_gqa=h != k)
        (o ** 2).sum().backward()
    rows.append((f"attention x {cfg.n_layers}", cfg.n_layers * _best(lambda: jax.block_until_ready(ga(q_, k_, v_)), n),
                 cfg.n_layers * _best(t_att, n)))

    w_VxD = jx.params.get("lm_head_VxD", jx.params["embed_VxD"])
    h_ = jnp.asarray(r.standard_normal((b, l, cfg.dim)), jnp.float32)
    tgt_j, mask_j = batch["targets"], batch["loss_mask"]
    gh = jax.jit(jax.grad(lambda h, w: head_loss_sum(h, w, tgt_j, mask_j), argnums=(0, 1)))
    th_ = torch.randn(b, l, cfg.dim, requires_grad=True)
    tw = torch.randn(cfg.vocab_size, cfg.dim, requires_grad=True)

    def t_head():
        torch.nn.functional.cross_entropy((th_ @ tw.T).flatten(0, 1), tgt.flatten(),
                                          reduction="sum").backward()
    rows.append(("lm_head + loss", _best(lambda: jax.block_until_ready(gh(h_, w_VxD)), n), _best(t_head, n)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (median shown)")
    ap.add_argument("--steps", type=int, default=3, help="steps timed per repetition")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pieces", action="store_true",
                    help="only time the pieces of a step apart (fastest of --reps), per config")
    args = ap.parse_args()

    if "device_count" in os.environ.get("XLA_FLAGS", ""):
        print("warning: XLA_FLAGS sets a device count; the jaxft figures will be low")
    import jax
    import torch
    torch.set_num_threads(args.threads)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{jax.device_count()} {jax.devices()[0].platform} device; torch {torch.__version__} "
          f"with {args.threads} threads; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"load {os.getloadavg()[0]:.2f}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}",
          flush=True)
    if args.pieces:
        for name in args.configs.split(","):
            print(f"\n{name}: fastest of {args.reps} calls per piece")
            print(f"{'piece':<18}{'jaxft ms':>10}{'torch ms':>10}{'ratio':>7}")
            for piece, tj, tt in pieces(name, args.reps):
                print(f"{piece:<18}{tj * 1e3:>10.1f}{tt * 1e3:>10.1f}{tt / tj:>6.2f}x", flush=True)
        return
    rows = [run_config(n, args) for n in args.configs.split(",")]
    print(f"\nmedian of {args.reps} interleaved reps x {args.steps} steps; MFU against "
          f"{jax.devices()[0].platform} peak; load now {os.getloadavg()[0]:.2f}")
    print(f"{'config':<9}{'params':>8}{'BxL':>9}{'jaxft ms':>10}{'torch ms':>10}"
          f"{'jaxft tok/s':>13}{'torch tok/s':>13}{'jaxft MFU':>11}{'torch MFU':>11}{'ratio':>7}")
    for r in rows:
        print(f"{r['name']:<9}{r['params_m']:>7.1f}M{r['b']:>4}x{r['l']:<4}{r['jax_s'] * 1e3:>10.1f}"
              f"{r['torch_s'] * 1e3:>10.1f}{r['jax_tok_s']:>13,.0f}{r['torch_tok_s']:>13,.0f}"
              f"{r['jax_mfu']:>11.1%}{r['torch_mfu']:>11.1%}{r['torch_s'] / r['jax_s']:>6.2f}x")


if __name__ == "__main__":
    main()
