"""Wall time of the two scoring passes users wait for, with jax's compile time split out:

    demo   the demo's base scoring: SmolLM2, 3-shot, 50 ViGGO validation examples, batch 25
    eval   `jaxft eval --task viggo --limit 100 --template chatml --batch-size 25
           --max-new-tokens 96` (zero-shot) on --ckpt

    PYTHONPATH=. .venv/bin/python bench/eval_time.py demo --ckpt runs/demo/smollm2-135m
    PYTHONPATH=/path/to/other/checkout ... bench/eval_time.py eval --ckpt DIR --json out.json

It imports whichever `jaxft` is on PYTHONPATH, so the same script times two checkouts one
after the other (bench/RESULTS.md). `--json` saves the raw predictions, to check that two
checkouts generate identical text.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax

import jaxft
import jaxft.generate as jgen
from jaxft.demo import eval_records
from jaxft.evaluate import load_eval_records, run_eval
from jaxft.state import load
from jaxft.templates import get_template

COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("demo", "eval"))
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--n", type=int, default=0, help="examples (default: demo 50, eval 100)")
    ap.add_argument("--json", default="", help="write predictions and timings here")
    ap.add_argument("--split", action="store_true", help="time the decoder's fills (prefill) "
                    "and decode calls apart, with the decode steps run (jaxft.decoder only)")
    ap.add_argument("--compile-cache", action="store_true",
                    help="use jaxft's persistent compilation cache ($JAXFT_COMPILE_CACHE)")
    args = ap.parse_args()
    if args.compile_cache:
        from jaxft import compile_cache  # late: the older checkout being compared has none
        compile_cache.enable()
    spent: dict[str, float] = defaultdict(float)
    batches: list[dict] = []
    inner = jgen.generate

    def timed_generate(model, prompts, max_new_tokens, **kw):
        before = dict(spent)
        t = time.perf_counter()
        new = inner(model, prompts, max_new_tokens, **kw)
        row = {"rows": len(prompts), "prompt_max": max(map(len, prompts)),
               "new_max": max(map(len, new)), "wall_s": time.perf_counter() - t,
               "compile_s": sum(spent.values()) - sum(before.values())}
        batches.append(row)
        print(json.dumps(row), flush=True)
        return new

    jgen.generate = timed_generate
    split: dict[str, float] = defaultdict(float)
    if args.split:
        _split_decoder(split)

    def listen(event, seconds, **kw):
        if event in COMPILE_EVENTS:
            spent[COMPILE_EVENTS[event]] += seconds
            if event.endswith("backend_compile_duration") and seconds > 0.5:
                print(f"compiled {kw.get('fun_name', '?')} in {seconds:.1f} s", flush=True)

    jax.monitoring.register_event_duration_secs_listener(listen)
    t0 = time.perf_counter()
    loaded = load(args.ckpt, need_tokenizer=True)
    if args.what == "demo":
        records, train = eval_records(50)
        records = records[:args.n or 50]
        kw = dict(shots=3, shot_records=train[:: max(1, len(train) // 97)][:3])
        template = get_template("chatml", True)
    else:
        records, _ = load_eval_records("viggo")
        kw = dict(limit=args.n or 100)
        template = get_template("chatml", False)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        metrics = run_eval(loaded.model, loaded.tokenizer, template, "viggo", records,
                           max_new_tokens=96, batch_size=25, out_dir=Path(d) / "o", **kw)
        t2 = time.perf_counter()
        rows = [json.loads(ln) for ln in (Path(d) / "o" / "predictions.jsonl").open()]
    out = {"jaxft": jaxft.__file__, "what": args.what, "load_s": t1 - t0, "score_s": t2 - t1,
           **{f"{k}_s": v for k, v in spent.items()}, **split, "metrics": metrics}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "batches": batches, "raw": [r["raw"] for r in rows]}, f)


def _split_decoder(split: dict) -> None:
    """Wraps `jaxft.decoder`'s two compiled calls to time them apart (each waits for its
    result, which the decoder's own host loop would do a moment later anyway)."""
    from jaxft import decoder  # late: older checkouts being compared have none

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            rows = jax.block_until_ready(fn(*a, **k))
            split[f"{name}_s"] += time.perf_counter() - t
            split["decode_steps"] = int(rows.step)
            split[f"{name}_calls"] += 1
            return rows
        return run

    decoder._fill, decoder._decode = timed("fill", decoder._fill), timed("decode", decoder._decode)


if __name__ == "__main__":
    main()
