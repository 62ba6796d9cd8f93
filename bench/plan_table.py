"""Smallest TPU slice for full fine-tuning of Llama-2 7B/13B/70B at seq 4096, from `jaxft plan`.

    .venv/bin/python bench/plan_table.py [--models llama2-7b ...] [--remat none full]
                                         [--cache /tmp/plan_runs.jsonl] [--budget-s 3600]

For each model and remat policy, walks meshes in order of device count (8 ... 256) and, at each
count, fsdp alone before fsdp x tensor (2, 4, 8), stopping once the per-device peak fits in
16 GiB (TPU v5e). The first mesh under 95 GiB (v5p) falls out of the same walk. Meshes that
cannot fit are skipped without a compile: too few chips for params + Adam + gradients, or a
tensor split whose temporaries already overflowed on fewer chips. The batch is one
row per data-parallel device, compute bf16, params fp32 + AdamW. Every configuration is its own
`python -m jaxft plan` process (it sets the fake CPU device count), so one compile's memory is
returned to the OS before the next; results are appended to --cache and reused on a rerun.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from jaxft.config import get_preset
from jaxft.model import param_count

GiB = 1024**3
CAPS = {"v5e": 16, "v5p": 95}  # HBM per chip, GiB
DEVICE_COUNTS = (8, 16, 32, 64, 128, 256)
TENSOR = (1, 2, 4, 8)
# fp32 params + Adam mu and nu, and the fp32 gradient alive at the update: bytes per param.
STATE_BYTES_PER_PARAM = 16
LINE = re.compile(r"^\s+(params|optimizer state|temporaries/activations|peak total)\s+"
                  r"([\d.]+) GiB per device")
KEYS = {"params": "params", "optimizer state": "opt", "temporaries/activations": "temp",
        "peak total": "peak"}


def meshes(model: str, n: int):
    """(fsdp, tensor) splits of n devices; tensor must divide the kv heads (else it would only
    replicate them)."""
    kv = get_preset(model).n_kv_heads
    return [(n // t, t) for t in TENSOR if n % t == 0 and kv % t == 0 and n // t >= 1]


def run_plan(model: str, fsdp: int, tensor: int, seq: int, remat: str) -> dict:
    mesh = f"fsdp={fsdp}" + (f",tensor={tensor}" if tensor > 1 else "")
    cmd = [sys.executable, "-m", "jaxft", "plan", "--model", model, "--mesh", mesh,
           "--batch", str(fsdp), "--seq", str(seq), "--remat", remat]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    r = {"model": model, "remat": remat, "seq": seq, "fsdp": fsdp, "tensor": tensor,
         "devices": fsdp * tensor, "batch": fsdp, "compile_s": round(time.perf_counter() - t0, 1)}
    if p.returncode:
        r["error"] = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
        return r
    for line in p.stdout.splitlines():
        m = LINE.match(line)
        if m:
            r[KEYS[m.group(1)] + "_gib"] = float(m.group(2))
    return r


def state_floor_gib(model: str, n: int) -> float:
    """Per-device bytes no mesh of n devices can avoid: params, Adam moments and gradients."""
    return param_count(get_preset(model)) * STATE_BYTES_PER_PARAM / n / GiB


def search(model: str, remat: str, seq: int, cached: dict, log, deadline: float):
    """Runs meshes in order until one fits v5e; returns every result, in order run, and
    whether the walk finished (False: the time budget ran out first)."""
    out = []
    for n in DEVICE_COUNTS:
        if state_floor_gib(model, n) > CAPS["v5p"]:
            continue  # cannot fit anywhere: skip the compile
        for fsdp, tensor in meshes(model, n):
            v5p_found = any(r.get("peak_gib", 1e9) <= CAPS["v5p"] for r in out)
            if state_floor_gib(model, n) > CAPS["v5e"] and v5p_found:
                break  # v5e is out of reach at this count and v5p is already found
            # With one row per data-parallel chip, adding chips does not shrink a chip's
            # temporaries: a tensor split whose temporaries alone overflowed stays out.
            if any(r["tensor"] == tensor and r.get("temp_gib", 1e9) > CAPS["v5e"]
                   and (v5p_found or r.get("temp_gib", 1e9) > CAPS["v5p"]) for r in out):
                continue
            key = (model, remat, seq, fsdp, tensor)
            if key not in cached:
                if time.time() > deadline:
                    return out, False
                cached[key] = run_plan(model, fsdp, tensor, seq, remat)
                log(cached[key])
            r = cached[key]
            out.append(r)
            if r.get("peak_gib", float("inf")) <= CAPS["v5e"]:
                return out, True
    return out, True


def first_fit(results: list[dict], cap: float):
    fits = [r for r in results if r.get("peak_gib", float("inf")) <= cap]
    # Fewest chips; among those, the least tensor parallelism (its all-reduces cost the most).
    return min(fits, key=lambda r: (r["devices"], r["tensor"])) if fits else None


def mesh_text(r: dict) -> str:
    return f"fsdp={r['fsdp']}" + (f",tensor={r['tensor']}" if r["tensor"] > 1 else "")


def summary_table(by_cfg: dict) -> str:
    rows = ["| model | remat | v5e (16 GiB): smallest mesh | peak GiB | v5p (95 GiB): smallest mesh "
            "| peak GiB |", "|---|---|---|---|---|---|"]
    for (model, remat), (results, done) in by_cfg.items():
        cells = []
        for cap in CAPS.values():
            r = first_fit(results, cap)
            miss = f"none up to {DEVICE_COUNTS[-1]} chips" if done else "not reached (time budget)"
            cells += ([f"{mesh_text(r)} ({r['devices']} chips)", f"{r['peak_gib']:.1f}"] if r else
                      [miss, "—"])
        rows.append(f"| {model} | {remat} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def detail_table(by_cfg: dict) -> str:
    rows = ["| model | remat | mesh | chips | batch | params | opt | temp | peak | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for results, _ in by_cfg.values():
        for r in results:
            vals = ([f"{r[k + '_gib']:.2f}" for k in ("params", "opt", "temp", "peak")]
                    if "peak_gib" in r else ["error: " + r.get("error", "?"), "", "", ""])
            rows.append(f"| {r['model']} | {r['remat']} | {mesh_text(r)} | {r['devices']} | "
                        f"{r['batch']} | " + " | ".join(vals) + f" | {r['compile_s']} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["llama2-7b", "llama2-13b", "llama2-70b"])
    ap.add_argument("--remat", nargs="+", default=["full", "none"])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--cache", default="/tmp/plan_runs.jsonl", help="results, appended per run")
    ap.add_argument("--budget-s", type=float, default=3 * 3600,
                    help="start no new compile after this many seconds")
    args = ap.parse_args()

    cache = Path(args.cache)
    cached = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            r = json.loads(line)
            cached[(r["model"], r["remat"], r["seq"], r["fsdp"], r["tensor"])] = r

    def log(r):
        with cache.open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), file=sys.stderr, flush=True)

    deadline = time.time() + args.budget_s
    by_cfg = {(m, rm): search(m, rm, args.seq, cached, log, deadline)
              for rm in args.remat for m in args.models}
    print(f"`{' '.join(['python', 'bench/plan_table.py', *sys.argv[1:]])}`, "
          f"{datetime.date.today()}, {platform.machine()} {os.cpu_count()}-core host, "
          f"seq {args.seq}, one row per data-parallel chip\n")
    print(summary_table(by_cfg) + "\n\n" + detail_table(by_cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
