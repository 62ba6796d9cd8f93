"""Task accuracy: generate an answer per record, score it with the task's metric, write results.

    OUT/predictions.jsonl  one line per record: line, prompt, gold, raw, prediction, correct
                           (the primary metric) and every metric of the task
    OUT/metrics.json       n, shots, accuracy per metric (and the judge's mean score, if used)

`TaskEvaluator` is the same pass on a fixed validation subset, for the training loop.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from jaxft import compile_cache
from jaxft import data as jdata
from jaxft.chat import get_template
from jaxft.config import EvalConfig, at_least, load_config
from jaxft.errors import ConfigError
from jaxft.generate import generate_text
from jaxft.judge import from_config
from jaxft.modeldir import atomic_dir, check_output
from jaxft.state import load
from jaxft.tasks import STOPS, get_task
from jaxft.templates import prompt_ids

SHOT_SEPARATOR = "\n\n"  # ends each few-shot example before the next prompt


def few_shot_ids(tok, template, shots: list[dict], ex: dict) -> list[int]:
    """BOS, then each shot exactly as training shows it (prompt and response tokenised apart,
    then EOS) and a blank line, then the query prompt: a base model learns the format, and
    where to stop, from the examples in front of it."""
    head = prompt_ids(tok, template, ex)
    n_bos = int(tok.bos_id is not None)
    ids = head[:n_bos]
    for s in shots:
        ids += (tok.encode(template.prompt(s)) + tok.encode(template.response(s)) + [tok.eos_id]
                + tok.encode(SHOT_SEPARATOR))
    return ids + head[n_bos:]


def score_predictions(task: str, records: list[dict], raw: list[str]) -> tuple[list[dict], dict]:
    """Per-record rows and accuracy per metric; `correct` is the task's primary metric."""
    mod = get_task(task)
    if len(raw) != len(records):
        raise ValueError(f"{len(raw)} predictions for {len(records)} records")
    rows = []
    for rec, text in zip(records, raw):
        scores = mod.score(text, rec)
        primary = next(iter(scores))
        rows.append({"line": rec.get("line"), "gold": rec["output"], "raw": text,
                     "prediction": mod.clean(text), "correct": bool(scores[primary]),
                     **{k: bool(v) for k, v in scores.items()}})
    names = list(scores) if rows else []
    n = len(rows)
    metrics = {"n": n, **{k: sum(r[k] for r in rows) / n for k in names}} if n else {"n": 0}
    return rows, metrics


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval (95 % at z=1.96) of k successes in n trials: honest at the
    0 % and 100 % ends and for small n, where the normal approximation is not."""
    if n == 0:
        return [0.0, 1.0]
    p, z2 = k / n, z * z
    mid, half = p + z2 / (2 * n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, (mid - half) / (1 + z2 / n)), min(1.0, (mid + half) / (1 + z2 / n))]


def intervals(rows: list[dict], metrics: dict) -> dict[str, list[float]]:
    """95 % intervals: Wilson for every accuracy, mean +- 1.96 standard errors for the judge."""
    out = {k: wilson(sum(r[k] for r in rows), len(rows)) for k in metrics
           if rows and isinstance(rows[0].get(k), bool)}
    scores = [r["judge_score"] for r in rows if r.get("judge_score") is not None]
    if len(scores) > 1:
        m, sd = statistics.fmean(scores), statistics.stdev(scores)
        out["judge_mean"] = [m - 1.96 * sd / math.sqrt(len(scores)), m + 1.96 * sd / math.sqrt(len(scores))]
    return out


def judge_rows(judge, records: list[dict], rows: list[dict], metrics: dict) -> None:
    """Adds the judge's 0-100 score per row and its mean to `metrics`; failures go to stderr."""
    items = [("\n\n".join(x for x in (r["instruction"], r["input"]) if x), r["output"], row["prediction"])
             for r, row in zip(records, rows)]
    report = judge.score_all(items)
    for row, s in zip(rows, report.scores):
        row["judge_score"] = s
    metrics["judge_mean"] = report.mean
    metrics["judge_scored"] = sum(s is not None for s in report.scores)
    metrics["judge_failed"] = len(report.errors)  # replies without a 0-100 score
    for e in report.errors:
        print(f"jaxft eval: {e}", file=sys.stderr)


def write_results(out_dir, rows: list[dict], metrics: dict, force: bool = False) -> Path:
    """Writes predictions.jsonl and metrics.json into out_dir, atomically; an existing out_dir
    is only replaced with force."""
    with atomic_dir(out_dir, force) as tmp:
        with open(tmp / "predictions.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return Path(out_dir)


def run_eval(model, tok, template, task: str, records: list[dict], *, limit: int = 0,
             shots: int = 0, shot_records: list[dict] | None = None, max_new_tokens: int = 128,
             batch_size: int = 8, out_dir=None, force: bool = False, judge=None,
             stop_strings=None, **sampling) -> dict:
    """Generates for the first `limit` records (0: all), scores, optionally judges and writes
    results; returns the metrics."""
    if out_dir is not None:
        check_output(out_dir, force)  # fail before spending time on generation
    records = records[:limit] if limit else list(records)
    prompts = None
    if shots:
        if not shot_records or len(shot_records) < shots:
            raise ConfigError(f"--shots {shots} needs {shots} training examples, "
                             f"got {len(shot_records or [])}")
        prompts = [few_shot_ids(tok, template, shot_records[:shots], ex) for ex in records]
    if stop_strings is None:  # a chat template also stops at its own turn end
        stop_strings = tuple(template.stops()) + STOPS if hasattr(template, "stops") else STOPS
    raw = generate_text(model, tok, template, records, max_new_tokens, stop_strings,
                        batch_size=batch_size, prompts=prompts, **sampling)
    rows, metrics = score_predictions(task, records, raw)
    metrics["shots"] = shots
    for row, ex in zip(rows, records):
        row["prompt"] = template.prompt(ex)
    if judge is not None:
        judge_rows(judge, records, rows, metrics)
    metrics["ci95"] = intervals(rows, metrics)
    if out_dir is not None:
        write_results(out_dir, rows, metrics, force)
    return metrics


class TaskEvaluator:
    """Task accuracy on a fixed validation subset, run by the training loop every N steps."""

    def __init__(self, tok, template, task: str, records: list[dict], n: int,
                 max_new_tokens: int, batch_size: int):
        self.tok, self.template, self.task = tok, template, task
        self.records = list(records[:n])
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def run(self, model) -> dict[str, float]:
        """{f"{task}_{metric}": accuracy} over the subset."""
        metrics = run_eval(model, self.tok, self.template, self.task, self.records,
                           max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        return {f"{self.task}_{k}": v for k, v in metrics.items() if k not in ("n", "shots", "ci95")}


# ---------------------------------------------------------------- CLI

# task -> (train file, eval file) under the data root; "" splits eval records off train
DEFAULT_FILES = {"viggo": ("viggo/train.csv", "viggo/valid.csv"),
                 "sql": ("wikisql/train.jsonl", "wikisql/valid.jsonl"),
                 "gsm8k": ("gsm8k/train.jsonl", ""),
                 "instruct": ("instruct-ch07/instruction-data.json", ""),
                 "chat": ("", "")}  # conversations: --data names the file


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="task accuracy of a model directory")
    p.add_argument("--ckpt", required=True, help="model directory")
    p.add_argument("--task", required=True, choices=sorted(DEFAULT_FILES))
    p.add_argument("--data", default="", help="records to evaluate (default: the task's "
                   "validation file or split under the data root)")
    p.add_argument("--split", default="valid", choices=("valid", "test"),
                   help="with no --data: which held-out split (test: ch07's 10 %% for instruct; "
                   "tasks with one held-out set give it for both)")
    p.add_argument("--limit", type=at_least(0), default=0, help="first N records only (0: all)")
    p.add_argument("--shots", type=at_least(0), default=0, help="few-shot training examples per prompt")
    p.add_argument("--out", default="", help="directory for predictions.jsonl and metrics.json")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--template", default="special-tokens",
                   help="prompt template; `tokenizer`: the model's own chat template")
    p.add_argument("--include-instruction", action="store_true",
                   help="keep the instruction in templates that can leave it out")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--judge-url", default="", help="Ollama /api/chat or OpenAI-compatible "
                   "/v1/chat/completions endpoint scoring responses 0-100 (off when empty)")
    p.add_argument("--judge-model", default="llama3")
    p.add_argument("--judge-timeout", type=float, default=60.0)
    p.add_argument("--judge-json", action="store_true",
                   help='constrain the judge\'s reply to {"score": N} by a JSON schema (Ollama '
                   "`format`, llama.cpp `response_format`): small judges then always score")
    p.add_argument("--allow-judge-failures", action="store_true",
                   help="exit 0 even when the judge scored no response")
    p.set_defaults(func=main)


def load_eval_records(task: str, data: str = "", shots: int = 0, seed: int = 0,
                      split: str = "valid"):
    """(records to evaluate, training records for shots), with the validation split the
    trainer uses when the task has no validation file."""
    train_file, valid_file = DEFAULT_FILES[task]
    if task == "chat" and not data:
        raise ConfigError("--task chat needs --data FILE (conversations: JSONL, JSON, Parquet)")
    if data and Path(data).expanduser().exists():  # a path as typed, not under the data root
        data = str(Path(data).expanduser().resolve())
    cfg = load_config(None, [f"data.task={task}", f"data.train_file={train_file}",
                             f"data.valid_file={data or valid_file}", f"data.seed={seed}"])
    records = jdata.load_split(cfg, split)[0]
    shot_records = jdata.load_split(cfg, "train")[0][:shots] if shots else None
    return records, shot_records


def main(args) -> int:
    compile_cache.enable()
    if args.out:
        check_output(args.out, args.force)
    loaded = load(args.ckpt, need_tokenizer=True)
    template = get_template(args.template, args.include_instruction, loaded.tokenizer)
    records, shot_records = load_eval_records(args.task, args.data, args.shots,
                                              split=args.split)
    judge = from_config(EvalConfig(judge_url=args.judge_url, judge_model=args.judge_model,
                                   judge_timeout_s=args.judge_timeout, judge_json=args.judge_json))
    metrics = run_eval(loaded.model, loaded.tokenizer, template, args.task, records,
                       limit=args.limit, shots=args.shots, shot_records=shot_records,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       out_dir=args.out or None, force=args.force, judge=judge)
    print(json.dumps(metrics))
    if judge is not None and metrics["n"] and not metrics["judge_scored"] \
            and not args.allow_judge_failures:
        print(f"jaxft eval: error: the judge scored none of the {metrics['n']} responses "
              f"({metrics['judge_failed']} replies without a score); pass "
              "--allow-judge-failures to accept that", file=sys.stderr)
        return 1
    return 0
