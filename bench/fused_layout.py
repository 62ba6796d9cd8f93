"""Fused parameter layout against separate matrices, forward + backward, on the CPU: q/k/v stored as
one [D, H*E + 2*K*E] matrix and gate/up as one [D, 2F], against jaxft's separate ones, SmolLM2's
layer shapes at 1024 tokens (batch 4 x 256), through `jaxft.kernels.linear` (its CPU VJP).

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python bench/fused_layout.py

Checks the two give the same input gradient first; prints the best of 5 x 20 calls, 3 times.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.kernels import linear
M, D, F, QKV = 1024, 576, 1536, 576 + 2 * 192
r = np.random.default_rng(0)
x = jnp.asarray(r.normal(size=(M, D)), jnp.float32)
def w(*s): return jnp.asarray(r.normal(size=s) / np.sqrt(s[0]), jnp.float32)
sep = dict(g=w(D, F), u=w(D, F), d=w(F, D), q=w(D, 576), k=w(D, 192), v=w(D, 192))
fus = dict(gu=jnp.concatenate([sep["g"], sep["u"]], 1), d=sep["d"],
           qkv=jnp.concatenate([sep["q"], sep["k"], sep["v"]], 1))
def f_sep(p, x):
    h = linear(jax.nn.silu(linear(x, p["g"])) * linear(x, p["u"]), p["d"])
    return jnp.sum(h) + jnp.sum(linear(x, p["q"])) + jnp.sum(linear(x, p["k"])**2) + jnp.sum(linear(x, p["v"])**3)
def f_fus(p, x):
    g, u = jnp.split(linear(x, p["gu"]), 2, axis=-1)
    q, k, v = jnp.split(linear(x, p["qkv"]), [576, 768], axis=-1)
    return jnp.sum(linear(jax.nn.silu(g) * u, p["d"])) + jnp.sum(q) + jnp.sum(k**2) + jnp.sum(v**3)
gs, gf = jax.jit(jax.grad(f_sep, argnums=(0, 1))), jax.jit(jax.grad(f_fus, argnums=(0, 1)))
a, b = gs(sep, x), gf(fus, x)
np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=2e-3, atol=1e-3)
def t(f, *a, n=20):
    jax.block_until_ready(f(*a)); best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n): jax.block_until_ready(f(*a))
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3
for rep in range(3):
    print("separate %.1f ms   fused %.1f ms" % (t(gs, sep, x), t(gf, fus, x)))
