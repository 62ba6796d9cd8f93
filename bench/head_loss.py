"""The fused LM head + loss (`kernels.head_loss_sum`, loss and both gradients) of this checkout
against another checkout's, on SmolLM2's head shape, at several fractions of tokens in the loss.

    git worktree add /tmp/old <commit>
    .venv/bin/python bench/head_loss.py --old /tmp/old

Both run jitted in one process, alternating, best of --reps; the losses are printed side by side.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def kernels_of(checkout: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, checkout / "jaxft" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", type=Path, required=True, help="the other checkout's root")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.47, 1.0],
                   help="tokens in the loss (0.47: the demo's ViGGO batches, prompt masked)")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    sides = {"old": kernels_of(args.old, "kernels_old"),
             "new": kernels_of(Path(__file__).resolve().parent.parent, "kernels_new")}
    r = np.random.default_rng(0)
    h = jnp.asarray(r.standard_normal((4, 256, 576)), jnp.float32)
    w = jnp.asarray(r.standard_normal((49152, 576)) / 24, jnp.float32)
    t = jnp.asarray(r.integers(0, 49152, (4, 256)), jnp.int32)
    print("| tokens in the loss | old ms | new ms | old / new | old loss | new loss |")
    print("|---|---|---|---|---|---|")
    for frac in args.fractions:
        m = jnp.asarray(r.random((4, 256)) < frac, jnp.int32)
        fns = {k: jax.jit(jax.value_and_grad(mod.head_loss_sum, argnums=(0, 1)))
               for k, mod in sides.items()}
        loss = {k: float(jax.block_until_ready(f(h, w, t, m))[0]) for k, f in fns.items()}
        best = dict.fromkeys(fns, float("inf"))
        for _ in range(args.reps):
            for k, f in fns.items():
                s = time.perf_counter()
                jax.block_until_ready(f(h, w, t, m))
                best[k] = min(best[k], time.perf_counter() - s)
        print(f"| {float(m.mean()):.0%} | {best['old'] * 1e3:.0f} | {best['new'] * 1e3:.0f} | "
              f"{best['old'] / best['new']:.2f}x | {loss['old']:.4f} | {loss['new']:.4f} |")


if __name__ == "__main__":
    main()
