"""Where jaxft's compiled train step spends its wall time, by the jaxft function each op came from.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python bench/step_profile.py --config smollm2

Builds `bench/train_step.py`'s config (random weights, full rows of random tokens), runs the
compiled step until it is warm, then traces `--steps` steps with `jax.profiler` (a Perfetto
trace). The compiled HLO's stack frames name the Python function every fused op was traced
from; each op is labelled with the innermost function under `jaxft/` (`kernels.py:linear`,
`optim.py:...`). Wall time is then split between labels: while several ops run on XLA's
threads at once, each gets its share, and "(idle)" is time with no op running at all. The
second column is thread time (an op on two threads counts twice).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

# bench/ is sys.path[0] when this file runs as a script
from train_step import CONFIGS, Jax, jax_batch, make_batches

# Thunk-executor bookkeeping and control flow: their children are the ops that do the work.
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "Wait", "Rendezvous", "while", "cond",
            "conditional")
OUTSIDE = "(outside jaxft)"  # ops traced from no function under jaxft/


def _table(lines: list[str], title: str, pattern: str) -> dict[int, tuple]:
    """One of the HLO text's numbered tables (FileNames, StackFrames, ...), id -> fields."""
    out, start = {}, lines.index(title) + 1
    for line in lines[start:]:
        m = re.match(r"(\d+) " + pattern, line.strip())
        if not m:
            break
        out[int(m.group(1))] = m.groups()[1:]
    return out


def op_labels(hlo: str) -> dict[str, str]:
    """HLO instruction name -> "file.py:function" of the innermost jaxft frame it came from;
    a fusion takes the label most of the instructions inside it carry."""
    lines = hlo.split("\n")
    files = _table(lines, "FileNames", r'"(.*)"')
    funcs = _table(lines, "FunctionNames", r'"(.*)"')
    locs = _table(lines, "FileLocations", r"\{file_name_id=(\d+) function_name_id=(\d+)")
    frames = _table(lines, "StackFrames", r"\{file_location_id=(\d+) parent_frame_id=(\d+)")

    def label(frame: int) -> str:
        seen = set()
        while frame in frames and frame not in seen:  # some frames name themselves as parent
            seen.add(frame)
            loc, parent = (int(x) for x in frames[frame])
            path, func = files[int(locs[loc][0])][0], funcs[int(locs[loc][1])][0]
            if "/jaxft/" in path:
                return f"{path.rsplit('/', 1)[-1]}:{func}"
            frame = parent
        return OUTSIDE

    inside, labels, comp = {}, {}, None
    for line in lines:
        head = re.match(r"%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            continue
        name = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        if not (name and frame):
            continue
        own = label(int(frame.group(1)))
        inside.setdefault(comp, collections.Counter())[own] += 1
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        called = inside.get(calls.group(1)) if calls else None
        labels[name.group(1)] = called.most_common(1)[0][0] if called else own
    return labels


def trace_ops(trace_dir: str) -> list[dict]:
    """The op events on XLA's CPU threads of the Perfetto trace under `trace_dir`."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS)
            and "XLA" in threads.get((e["pid"], e["tid"]), "")]


def wall_shares(ops: list[dict], labels: dict[str, str]):
    """(wall us per label, thread us per label, span us): overlapping ops share the wall."""
    edges = []
    for e in ops:
        lab = labels.get(e["name"], OUTSIDE)
        edges += [(e["ts"], 1, lab), (e["ts"] + e["dur"], -1, lab)]
    edges.sort()
    running, wall, thread = collections.Counter(), collections.Counter(), collections.Counter()
    last = edges[0][0]
    for ts, delta, lab in edges:
        live = sum(running.values())
        for k, n in running.items():
            if n:
                wall[k] += (ts - last) * n / live
        if not live:
            wall["(idle)"] += ts - last
        last = ts
        running[lab] += delta
    for e in ops:
        thread[labels.get(e["name"], OUTSIDE)] += e["dur"]
    return wall, thread, edges[-1][0] - edges[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="smollm2", choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=1, help="steps traced")
    ap.add_argument("--top", type=int, default=20, help="labels shown")
    args = ap.parse_args()
    cfg, b, l = CONFIGS[args.config]
    jx = Jax(cfg, None, 1e-4)
    batch = jax_batch(make_batches(cfg, b, l, 1, 0)[0], jx.mesh)
    # The step runs the compiled object whose HLO is read: jit's own dispatch would compile again.
    jx.fn = jx.fn.lower(jx.params, jx.opt, batch).compile()
    hlo = jx.fn.as_text()
    step = lambda: jx.step(batch)  # noqa: E731
    for _ in range(2):
        step()  # warm: allocator, thread pools
    with tempfile.TemporaryDirectory(prefix="step-profile-") as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                step()
        took = (time.perf_counter() - t0) / args.steps
        wall, thread, span = wall_shares(trace_ops(d), op_labels(hlo))
    n = args.steps * 1e3
    print(f"{args.config}: {took * 1e3:.0f} ms a step traced, ops span {span / n:.0f} ms\n"
          f"{'wall ms':>9} {'thread ms':>10}  jaxft function")
    for lab, us in wall.most_common(args.top):
        print(f"{us / n:9.1f} {thread[lab] / n:10.1f}  {lab}")


if __name__ == "__main__":
    main()
