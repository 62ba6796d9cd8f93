"""A judge-free score for ch07 instruct: lm-eval's `generate_until` on ch07's test split, scored
by ROUGE-L F1 against the reference responses, through a local task YAML (no hub access).

    python bench/ch07_rouge.py --model base=runs/smollm2 --model tuned=runs/smollm2-instruct/final \
        --out runs/ch07-rouge [--template alpaca] [--split test] [--limit 0]

Writes OUT/task/ (the YAML, its utils.py and the rendered records as test.jsonl), runs every
model through lm-eval's `jaxft` backend, prints one table and writes OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# bench/lm_eval.py would shadow the lm_eval package for a script run from this folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jaxft.evaluate import load_eval_records  # noqa: E402
from jaxft.templates import get_template  # noqa: E402

TASK = "ch07_rouge"
UTILS = '''from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(doc, results):
    return {"rougeL": _SCORER.score(doc["reference"], results[0].strip())["rougeL"].fmeasure}
'''
YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["### Instruction:", "### Input:", "### Response:"]
  max_gen_toks: {max_gen}
  do_sample: false
process_results: !function utils.rouge_l
metric_list:
  - metric: rougeL
    aggregation: mean
    higher_is_better: true
"""


def write_task(out: Path, template: str, split: str, limit: int, max_gen: int) -> Path:
    """OUT/task with ch07's split rendered by the jaxft template the model was trained on."""
    tpl = get_template(template)
    records, _ = load_eval_records("instruct", split=split)
    records = records[:limit] if limit else records
    d = out / "task"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": tpl.prompt(r), "reference": r["output"]} for r in records]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "utils.py").write_text(UTILS)
    (d / f"{TASK}.yaml").write_text(YAML.format(task=TASK, data=d / "test.jsonl", max_gen=max_gen))
    return d


def run_model(task_dir: Path, path: str, batch_size: int) -> tuple[dict, float]:
    import lm_eval  # the optional [eval] extra
    from lm_eval.tasks import TaskManager  # (the same extra)

    import jaxft.lm_eval  # noqa: F401  (registers the "jaxft" model)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="jaxft", model_args=f"path={path},batch_size={batch_size}",
                                  tasks=[TASK], task_manager=tm)
    return out["results"][TASK], time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="LABEL=MODEL_DIR (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--template", default="alpaca")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(argv)
    out = Path(a.out)
    task_dir = write_task(out, a.template, a.split, a.limit, a.max_gen_toks)
    results = {}
    for spec in a.model:
        label, _, path = spec.partition("=")
        res, secs = run_model(task_dir, path, a.batch_size)
        results[label] = {"path": path, "rougeL": res["rougeL,none"],
                          "stderr": res.get("rougeL_stderr,none"), "seconds": round(secs, 1)}
        print(json.dumps({label: results[label]}), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    n = sum(1 for _ in open(task_dir / "test.jsonl"))
    print(f"\nch07 {a.split} split, {n} records, template {a.template}, greedy, "
          f"max {a.max_gen_toks} new tokens, ROUGE-L F1 (lm-eval generate_until):")
    print("| model | ROUGE-L F1 | stderr | seconds |\n|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['rougeL']:.4f} | {r['stderr']} | {r['seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
