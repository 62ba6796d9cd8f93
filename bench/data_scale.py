"""Data at scale: the lazy, sharded loader against today's eager one, on synthetic JSONL.

    .venv/bin/python bench/data_scale.py [--sizes 10000,100000,1000000] [--batches 40]
        [--eager-max 100000] [--dir /tmp/jaxft-data-scale]

Writes gsm8k-shaped JSONL files ({"question", "answer"}, ~300 tokens an example with a
400-piece SentencePiece trained on the same generator), then for each size runs every
loader in a fresh process (so peak RSS is that loader's own) and reports time to the first
batch (from opening the split), the process's peak RSS, steady batches/s over --batches
batches of 8 x 512 packed rows (the packer
fills 64 rows at a time, so short runs mostly measure its buffer), and the share of the dataset the process read and tokenised.
Rows: lazy with 0 and 2 workers; lazy as process 0 of a simulated 8-process split (one shared
index); today's eager pipeline (tests/eager_pipeline.py) up to --eager-max examples. The JSONL
index is built in the first lazy run of each size (cache under --dir) and reused after.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

WORDS = ("apple orange river mountain train ticket seven twelve price market buy sell each "
         "total money friend school book page minute hour garden plant water bottle").split()
# bench/RESULTS.md, "One epoch of ViGGO train": the small Llama (dim 256, 4 layers) on this
# CPU takes 4.055 s per 8 x 512 packed batch.
TRAIN_STEP_S = 4.055


def example(rng: random.Random, i: int) -> dict:
    q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(110, 150)))
    a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(130, 170)))
    return {"question": f"Problem {i}: {q}?", "answer": f"{a}\n#### {rng.randint(1, 999)}"}


def write_data(path: Path, n: int) -> None:
    if path.exists():
        return
    rng = random.Random(n)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(n):
            f.write(json.dumps(example(rng, i)) + "\n")
    tmp.rename(path)


def make_tokenizer(out: Path) -> Path:
    from jaxft.tokenizer import train_sentencepiece
    if not (out / "tok").exists():
        rng = random.Random(0)
        texts = [t for i in range(2000) for t in example(rng, i).values()]
        train_sentencepiece(texts, vocab_size=400, out_dir=out / "sp").save(out / "tok")
    return out / "tok"


def child(spec: dict) -> dict:
    """One loader in this process: time to first batch, steady speed, RSS, share read."""
    from eager_pipeline import make_eager_loader
    from jaxft import batches, data
    from jaxft.config import load_config
    from jaxft.tasks import read_records
    cfg = load_config(None, ["data.task=gsm8k", f"data.train_file={spec['file']}",
                             "data.valid_file=unused", f"data.tokenizer={spec['tok']}",
                             "data.max_length=512", "data.batch_size=8", "data.padding=pack",
                             f"data.worker_count={spec['workers']}"])
    tok = data.build_tokenizer(cfg)
    read = set()
    t0 = time.perf_counter()
    if spec["kind"] == "eager":
        records, _ = read_records("gsm8k", spec["file"])
        loader = make_eager_loader(cfg, tok, records, train=True, process_index=0,
                                   process_count=1)
        n = len(records)
    else:
        split = data.open_split(cfg, "train")
        n = len(split)

        class Counted:  # notes which records this process reads (workers=0 only)
            def __len__(self):
                return len(split)

            def __getitem__(self, i):
                read.add(i)
                return split[i]
        loader = batches.make_loader(cfg, tok, Counted() if spec["workers"] == 0 else split,
                                  train=True, process_index=0, process_count=spec["procs"])
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(spec["batches"]):
        next(it)
    steady = spec["batches"] / (time.perf_counter() - t1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"first_s": first, "batches_s": steady, "rss_mb": rss, "worker_mb": workers_rss, "n": n,
            "read": len(read) / n if read else None}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--eager-max", type=int, default=100000)
    p.add_argument("--dir", default="/tmp/jaxft-data-scale")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["JAXFT_CACHE"] = str(out / "cache")
    tok = make_tokenizer(out)
    print(f"load {os.getloadavg()[0]:.1f} at start; train step {TRAIN_STEP_S} s/batch "
          f"= {1 / TRAIN_STEP_S:.3f} batches/s consumed")
    print("| examples | file MB | loader | first batch s | peak RSS MB (largest worker) | "
          "batches/s | x train step | share tokenised |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        path = out / f"synthetic-{n}.jsonl"
        t0 = time.perf_counter()
        write_data(path, n)
        mb = path.stat().st_size / 2**20
        print(f"<!-- wrote {path} in {time.perf_counter() - t0:.0f} s -->", flush=True)
        runs = [("lazy, 0 workers", "lazy", 0, 1), ("lazy, 2 workers", "lazy", 2, 1),
                ("lazy, process 0 of 8", "lazy", 0, 8)]
        if n <= args.eager_max:
            runs.append(("eager (today)", "eager", 0, 1))
        for name, kind, workers, procs in runs:
            r = run_child({"file": str(path), "tok": str(tok), "kind": kind, "workers": workers,
                           "procs": procs, "batches": args.batches})
            share = "all" if kind == "eager" else (f"{r['read']:.4f}" if r["read"] else "?")
            print(f"| {n:,} | {mb:.0f} | {name} | {r['first_s']:.2f} | {r['rss_mb']:.0f}"
                  + (f" ({r['worker_mb']:.0f})" if r["worker_mb"] else "") + f" | "
                  f"{r['batches_s']:.2f} | {r['batches_s'] * TRAIN_STEP_S:.0f}x | {share} |",
                  flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
