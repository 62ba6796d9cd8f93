"""Prompt-lookup drafts on real prompts: SmolLM2-135M-Instruct, one prompt at a time (what
`jaxft generate` does), greedy, stopping at the chat template's turn end, jaxft with and
without drafts against HF `generate` with and without `prompt_lookup_num_tokens`, on the same
weights (the jaxft model exported with `jaxft.convert.to_hf_dir`).

    PYTHONPATH=. .venv/bin/python bench/lookup_decode.py --ckpt runs/smollm2 --n 8 --draft 4 8

Prompts: the first ViGGO validation examples and ch07 instructions (`$JAXFT_DATA`), each as
one user turn in the tokenizer's chat template. A random model's looping output would flatter
drafts; these are the answers the real model gives. Every prompt's tokens must be equal in
all jaxft rows (asserted) and are compared with HF's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("JAXFT_DATA", "../shared/data"))


def prompts_of(task: str, n: int) -> list[str]:
    """n user turns: ViGGO's instruction and input, or a ch07 instruction and its input."""
    from jaxft.tasks import read_records
    path = {"viggo": DATA / "viggo" / "valid.csv",
            "instruct": DATA / "instruct-ch07" / "instruction-data.json"}[task]
    records, _ = read_records(task, path)
    return [(r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")).strip()
            for r in records[:n]]


def passes_counter():
    """Wraps jaxft.decoder._decode to count the decode passes (the loop's `step`)."""
    from jaxft import decoder
    inner, seen = decoder._decode, []

    def counted(*a, **kw):
        out = inner(*a, **kw)
        seen.append(int(out.step))
        return out
    decoder._decode = counted
    return seen


def time_jaxft(model, prompts, n, stops, draft: int, seen: list) -> tuple[list, float, int]:
    from jaxft.generate import generate
    out, total, passes = [], 0.0, 0
    for ids in prompts:
        generate(model, [ids], n, eos_ids=stops, draft=draft)  # compile / warm
        seen.clear()
        t = time.perf_counter()
        out.append(generate(model, [ids], n, eos_ids=stops, draft=draft)[0])
        total += time.perf_counter() - t
        passes += seen[-1]
    return out, total, passes


def time_hf(hf, prompts, n, stops, draft: int) -> tuple[list, float]:
    import torch
    out, total = [], 0.0
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=list(stops), pad_token_id=stops[0])
    if draft:
        kw["prompt_lookup_num_tokens"] = draft
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            hf.generate(x, attention_mask=torch.ones_like(x), **kw)  # warm
            t = time.perf_counter()
            y = hf.generate(x, attention_mask=torch.ones_like(x), **kw)[0, len(ids):].tolist()
            total += time.perf_counter() - t
            out.append(y)
    return [cut(y, stops) for y in out], total


def cut(ids: list[int], stops) -> list[int]:
    """The tokens before the first stop (jaxft's generate drops the stop token too)."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def run_task(task, turns, model, tok, template, hf, stops, seen, args) -> list[dict]:
    """Times every method on the task's prompts and prints its table rows."""
    prompts = [template.prompt_ids(tok, {"messages": [{"role": "user", "content": c}]})
               for c in turns]
    n = args.max_new_tokens
    theirs, t_hf = time_hf(hf, prompts, n, stops, 0)
    rows, base = [], None
    for k in [0] + args.draft:
        ours, t, passes = time_jaxft(model, prompts, n, stops, k, seen)
        base = base or ours
        assert ours == base, f"{task}: drafts of {k} changed jaxft's tokens"
        rows.append((f"jaxft, {k} drafts" if k else "jaxft", ours, t, passes))
    rows.append(("HF generate", theirs, t_hf, 0))
    for k in args.draft:
        looked, t = time_hf(hf, prompts, n, stops, k)
        assert looked == theirs, f"{task}: HF's drafts of {k} changed its tokens"
        rows.append((f"HF, prompt_lookup_num_tokens={k}", looked, t, 0))
    hf_rate = sum(map(len, theirs)) / t_hf
    out = []
    for name, got, t, passes in rows:
        n_tok = sum(map(len, got))
        per_pass = f"{n_tok / passes:.2f}" if passes else ""
        print(f"| {task} | {name} | {n_tok} | {t:.2f} | {n_tok / t:.1f} | {per_pass} | "
              f"{n_tok / t / hf_rate:.2f}x |", flush=True)
        out.append({"method": name, "tokens": n_tok, "s": t, "passes": passes})
    same = sum(a == b for a, b in zip(base, theirs))
    print(f"| {task} | {same} of {len(prompts)} answers token-equal between jaxft and HF "
          f"(mean answer {np.mean([len(x) for x in base]):.0f} tokens) | | | | | |", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="jaxft model dir (jaxft convert --from-gguf of the wheel)")
    ap.add_argument("--n", type=int, default=8, help="prompts per task")
    ap.add_argument("--tasks", nargs="+", default=["viggo", "instruct"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--draft", type=int, nargs="+", default=[4])
    ap.add_argument("--json", default="", help="write the per-task figures here")
    args = ap.parse_args()

    import jax
    import torch
    from transformers import LlamaForCausalLM

    from jaxft import chat, compile_cache
    from jaxft.convert import to_hf_dir
    from jaxft.state import load
    compile_cache.enable()
    loaded = load(args.ckpt, need_tokenizer=True)
    tok = loaded.tokenizer
    template = chat.get_template(chat.NAME, tok=tok)
    stops = tuple(dict.fromkeys([tok.eos_id] + [i for i in map(tok.token_id, template.stops())
                                                if i is not None]))
    with tempfile.TemporaryDirectory(prefix="bench-lookup-") as d:
        to_hf_dir(args.ckpt, Path(d) / "hf")
        hf = LlamaForCausalLM.from_pretrained(Path(d) / "hf", torch_dtype=torch.float32).eval()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{time.strftime('%Y-%m-%d %H:%M')}; batch 1, greedy, <= {args.max_new_tokens} new tokens")
    print(f"\n| task | method | tokens | s | tokens/s | tokens a pass | vs HF plain |")
    print("|---|---|---|---|---|---|---|")
    seen = passes_counter()
    results = {task: run_task(task, prompts_of(task, args.n), loaded.model, tok, template, hf,
                              stops, seen, args) for task in args.tasks}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
