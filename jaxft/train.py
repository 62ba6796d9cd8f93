"""`jaxft train CONFIG [--out DIR] [--set key=value ...]`: the full-parameter training loop.

The train step (jaxft/step.py) is a pure function of (params, opt_state, batch), jitted once with
in/out shardings and donation. Re-running the same command resumes from the run directory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from jaxft import batches, checkpoint, config as config_lib, data, distributed, modeldir, sharding, state
from jaxft.config import Config, check_batch_split
from jaxft.errors import ConfigError
from jaxft.evaluate import TaskEvaluator
from jaxft.model import param_count
from jaxft.optim import make_optimizer, schedule
from jaxft.report import Report, read_metrics
from jaxft.step import (compile_eval_step, compile_train_step, eval_loss, flops_per_token,
                        peak_flops, to_global)
from jaxft.chat import get_template
from jaxft.tokenizer import load_tokenizer

# Keys that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"train.steps", "train.time_limit_s", "train.progress", "train.log_every",
                     "train.eval_every", "train.tensorboard", "train.patience", "eval.every"}

def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling" and k != "fields":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(run_dir: Path, cfg: Config, fingerprint: dict) -> None:
    """Refuses to resume a run dir that holds a run of another config, or on other data."""
    saved_path, data_path = run_dir / "config.yaml", run_dir / "data.json"
    if saved_path.exists():
        old = _flat(yaml.safe_load(saved_path.read_text()))
        diff = sorted(k for k, v in _flat(config_lib.to_dict(cfg)).items()
                      if old.get(k) != v and k not in RESUMABLE_CHANGES)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(diff)} differ); "
                f"use another --out, or resume with the same config")
    if data_path.exists():
        old = json.loads(data_path.read_text())
        diff = sorted(k for k in old.keys() | fingerprint.keys() if old.get(k) != fingerprint.get(k))
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run trained on other data ({', '.join(diff)} changed since "
                f"it started); use another --out, or resume on the same files")


def write_run_record(run_dir: Path, cfg: Config, fingerprint: dict) -> None:
    """config.yaml and data.json, once the run is known to start or resume."""
    if jax.process_index() == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
        (run_dir / "data.json").write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


@dataclass
class Run:
    """Everything a prepared run holds: its static parts, then the state the loop advances."""
    cfg: Config  # the run's own copy, with the model config it resolved
    run_dir: Path
    mesh: Any
    tok: Any
    layout: state.Layout
    loader: batches.Loader
    vloader: batches.Loader | None
    ckpts: checkpoint.Checkpoints
    report: Report
    step_fn: Any
    eval_fn: Any
    task_eval: Any
    params: dict
    opt_state: Any
    rng: jax.Array
    step: int
    resumed: bool
    best: float = math.inf  # lowest validation loss so far
    since_best: int = 0  # evals since it
    tokens_seen: int = 0
    last_eval: int = -1
    last_loss: float = float("nan")
    lr_at: Any = None  # step -> learning rate, for the log
    flops_per_row: float = 0.0  # training FLOPs per token slot, for MFU
    peak_flops: float | None = None  # of all devices; None: no MFU is logged

    def save(self, wait: bool = False) -> None:
        if self.ckpts.saved(self.step):  # saved at this step already (ckpt_every hit the end)
            return self.ckpts.wait() if wait else None
        rep = sharding.replicated(self.mesh)
        self.ckpts.save(self.step, {"params": self.params, "opt": self.opt_state, "rng": self.rng,
                                    "step": distributed.replicate(np.int32(self.step), rep)},
                        self.loader.get_state(), wait=wait)

    def model(self):
        return nnx.merge(self.layout.graphdef, self.params)

    def evaluate(self) -> None:
        """Validation loss (and task accuracy when due); keeps best/ at the lowest loss."""
        self.last_eval = self.step
        rec = {"kind": "eval", "step": self.step, "tokens_seen": self.tokens_seen}
        if self.eval_fn is not None:
            rec["val_loss"] = eval_loss(self.eval_fn, self.params, self.vloader, self.mesh,
                                        self.cfg.train.eval_batches)
        if self.task_eval is not None and self.step % self.cfg.eval.every == 0:
            rec.update(self.task_eval.run(self.model()))
        self.report.log(rec)
        self.report.message("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in rec.items() if k != "kind"))
        if rec.get("val_loss", math.inf) < self.best:
            self.best, self.since_best = rec["val_loss"], 0
            modeldir.save_model(self.run_dir / "best", self.model(), self.tok, force=True)
        elif "val_loss" in rec:
            self.since_best += 1

    def train_step(self, batch: dict, since: float) -> float:
        """Runs one optimizer step on this process's `batch` and logs it (speed measured from
        `since`, the end of the previous step); returns the loss."""
        self.params, self.opt_state, m = self.step_fn(self.params, self.opt_state,
                                                      to_global(batch, self.mesh))
        loss = self.last_loss = float(m["loss"])  # waits for the step
        seconds = time.perf_counter() - since
        self.step += 1
        if not math.isfinite(loss):
            return loss
        self.tokens_seen += int(m["tokens"])
        nonpad = int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()
        if self.step % self.cfg.train.log_every == 0 or self.step == self.cfg.train.steps:
            rec = {"kind": "train", "step": self.step, "loss": loss, "tokens": int(m["tokens"]),
                   "tokens_seen": self.tokens_seen, "lr": float(self.lr_at(self.step - 1)),
                   "grad_norm": float(m["grad_norm"]), "tok_s": nonpad / seconds}
            if self.peak_flops:
                rows = batch["inputs"].size * jax.process_count()
                rec["mfu"] = self.flops_per_row * rows / seconds / self.peak_flops
            self.report.log(rec)
        self.report.progress(self.step, loss, nonpad / seconds)
        return loss


def _run_tokenizer(cfg: Config, run_dir: Path, train_records):
    """The run dir's tokenizer on a resume, else a new one saved there."""
    tok_dir = run_dir / "tokenizer"
    resume = tok_dir.is_dir()
    # Every process looks before process 0 writes: one that looked while the directory existed
    # but its files did not yet would take the resume branch and fail to load them.
    distributed.barrier("tokenizer looked for")
    if resume:
        tok = load_tokenizer(tok_dir)
    else:
        tok = data.build_tokenizer(cfg, train_records)
        if jax.process_index() == 0:
            tok.save(tok_dir)
    distributed.barrier("tokenizer saved")  # every process, whichever branch it took
    return tok


def _restore_or_init(cfg: Config, layout: state.Layout, ckpts, loader) -> tuple:
    """(step, params, opt_state, rng, resumed) from the newest good checkpoint, else fresh."""
    rep = sharding.replicated(layout.mesh)
    abstract = {"params": layout.abs_params, "opt": layout.abs_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    restored = ckpts.restore_latest(abstract)
    if restored is None and ckpts.failures:
        why = "; ".join(f"step {step}: {reason}" for step, reason in ckpts.failures)
        raise ConfigError(f"{ckpts.dir.parent} holds a run, but none of its checkpoints restores "
                          f"({why}). Nothing was changed. To start over, rerun with --restart "
                          f"(the old run is moved aside, not deleted), or use another --out")
    if restored:
        step, st, data_state = restored
        loader.set_state(data_state)
        return step, st["params"], st["opt"], st["rng"], True
    rng = distributed.replicate(jax.random.key_data(jax.random.PRNGKey(cfg.train.seed)), rep)
    params = (state.pretrained_params(cfg.train.init, layout.cfg, layout.mesh, layout.params_sh)
              if cfg.train.init else state.init_params(layout, cfg.train.seed))
    return 0, params, state.init_opt(layout, params), rng, False


def _resume_history(r: Run) -> None:
    """Best val loss, evals since it and tokens seen, from the metrics of the restored steps."""
    r.report.truncate_after(r.step)
    history = read_metrics(r.report.path) if r.report.path.exists() else []
    vals = [x["val_loss"] for x in history if x.get("kind") == "eval" and "val_loss" in x]
    if vals:
        r.best, r.since_best = min(vals), len(vals) - 1 - int(np.argmin(vals))
    r.tokens_seen = max([x.get("tokens_seen", 0) for x in history] or [0])


def prepare(cfg: Config, run_dir: str | Path) -> Run:
    """Mesh, data, tokenizer, layout, compiled steps, and the state restored or initialised."""
    run_dir = Path(run_dir)
    mesh = sharding.make_mesh(cfg.mesh)  # a mesh/device mismatch fails before any compile
    check_batch_split(cfg.data.batch_size, grad_accum=cfg.optim.grad_accum,
                      data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])
    # Lazy splits: nothing is tokenised here, each process encodes its shard as it trains.
    train_records = data.open_split(cfg, "train")
    valid_records = data.open_split(cfg, "valid") if cfg.train.eval_every else []
    run_dir.mkdir(parents=True, exist_ok=True)
    tok = _run_tokenizer(cfg, run_dir, train_records)
    cfg = dataclasses.replace(cfg, model=state.model_config(cfg, len(tok)))
    fingerprint = data.fingerprint(cfg)
    check_resume(run_dir, cfg, fingerprint)
    layout = state.make_layout(cfg.model, mesh, make_optimizer(cfg.optim, cfg.train.steps))
    loader = batches.make_loader(cfg, tok, train_records, train=True)
    ckpts = checkpoint.Checkpoints(run_dir / "ckpt", keep=cfg.train.keep)
    step, params, opt_state, rng, resumed = _restore_or_init(cfg, layout, ckpts, loader)
    write_run_record(run_dir, cfg, fingerprint)  # only now: a refused resume changes nothing
    eval_fn = compile_eval_step(layout) if cfg.train.eval_every else None
    r = Run(cfg, run_dir, mesh, tok, layout, loader,
            batches.make_loader(cfg, tok, valid_records, train=False) if eval_fn else None, ckpts,
            Report(run_dir, cfg.train.steps, step, cfg.train.progress, cfg.train.tensorboard),
            compile_train_step(layout, cfg.optim.grad_accum), eval_fn, _task_evaluator(cfg, tok),
            params, opt_state, rng, step, resumed)
    r.lr_at = schedule(cfg.optim, cfg.train.steps)
    r.flops_per_row = flops_per_token(cfg.model, cfg.data.max_length)
    peak = peak_flops()
    r.peak_flops = peak * jax.device_count() if peak else None
    _resume_history(r)
    return r


def eval_due(t, step: int) -> bool:
    """Whether the loop takes a val loss after `step` (t: the train config)."""
    return bool(t.eval_every) and step % t.eval_every == 0


def eval_steps(t) -> list[int]:
    """The steps a run that goes to the end takes a val loss at: every `eval_every`, and the
    last step (`finish` evaluates there when the loop did not)."""
    due = [s for s in range(1, t.steps + 1) if eval_due(t, s)]
    return due + [t.steps] if t.eval_every and t.steps not in due else due


def train_loop(r: Run, stop: threading.Event) -> str:
    """Steps until the run ends; returns why: done, early, time, sigterm or nan."""
    t = r.cfg.train
    it = iter(r.loader)
    t_start = t_last = time.perf_counter()
    while r.step < t.steps:
        batch = next(it)
        loss = r.train_step(batch, t_last)
        t_last = time.perf_counter()
        if not math.isfinite(loss):
            return "nan"
        if eval_due(t, r.step):
            r.evaluate()
            if t.patience and r.since_best >= t.patience:
                return "early"
        if stop.is_set():
            return "sigterm"
        if t.time_limit_s and t_last - t_start > t.time_limit_s:
            return "time"
        if t.ckpt_every and r.step % t.ckpt_every == 0:
            r.save()
        r.ckpts.poll()
    return "done"


def finish(r: Run, why: str) -> tuple[int, str]:
    """Saves what the way the loop ended calls for; returns (exit status, closing line)."""
    if why == "nan":
        good = r.ckpts.good_steps()
        return 1, (f"jaxft: loss is {r.last_loss} at step {r.step}; stopping. The last good "
                   f"checkpoint is {'step ' + str(good[-1]) if good else 'none'} in {r.ckpts.dir}")
    if why == "sigterm":
        r.save(wait=True)
        return 0, f"jaxft: SIGTERM: saved step {r.step} to {r.ckpts.dir}; exiting"
    if why == "early":
        r.report.message(f"jaxft: early stop at step {r.step}: no val improvement in "
                         f"{r.since_best} evals (best {r.best:.4f})")
    elif why == "time":
        r.report.message(f"jaxft: time limit {r.cfg.train.time_limit_s:.0f}s reached at step {r.step}")
    if r.cfg.train.eval_every and r.last_eval != r.step:
        r.evaluate()
    r.save(wait=True)
    modeldir.save_model(r.run_dir / "final", r.model(), r.tok, force=True)
    best = math.isfinite(r.best)
    return 0, (f"jaxft: done at step {r.step}: train loss {r.last_loss:.4f}"
               + (f", best val loss {r.best:.4f}" if best else "")
               + f". Outputs in {r.run_dir}: metrics.jsonl, loss.png, final/"
               + (", best/" if best else ""))


def run(cfg: Config, run_dir: str | Path) -> int:
    """Trains (or resumes) the run in `run_dir`; SIGTERM saves at the next step and exits 0."""
    r = prepare(cfg, run_dir)
    if r.resumed and r.step >= r.cfg.train.steps and (r.run_dir / "final").is_dir():
        # finished: nothing to do, and nothing is rewritten
        r.ckpts.close()
        r.report.close(plot=False)
        r.report.message(f"jaxft: {r.run_dir} is finished at step {r.step} (train.steps="
                         f"{r.cfg.train.steps}); nothing to do. Raise train.steps to extend it")
        return 0
    r.report.message(f"jaxft: {param_count(r.cfg.model) / 1e6:.1f}M params on mesh "
                     f"{dict(r.mesh.shape)}; {'resuming at step ' + str(r.step) if r.resumed else 'starting'}"
                     f"; run dir {r.run_dir}")
    _report_data(r)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        status, closing = finish(r, train_loop(r, stop))
    finally:
        signal.signal(signal.SIGTERM, previous)
        r.ckpts.close()
        r.report.close()
    r.report.message(closing)
    return status


def _report_data(r: Run) -> None:
    """What filtering does to the training data, in the run's first lines, from the first
    records of this process's shard (the pipeline is lazy; `jaxft audit` counts them all)."""
    c = r.loader.counts
    seen = c.examples + c.dropped
    r.report.message(f"jaxft: data: of the first {seen} records of this shard {c.examples} are "
                     f"kept; {c.truncated} truncated to data.max_length={r.cfg.data.max_length}, "
                     f"{c.dropped} dropped ({c.no_target} without a target)")
    if seen and (c.truncated + c.dropped) > seen / 2:
        r.report.message("jaxft: WARNING: more than half of the training records are truncated "
                         "or dropped; check data.max_length and the template (`jaxft audit`)")


def _task_evaluator(cfg: Config, tok):
    if not (cfg.eval.task and cfg.eval.every):
        return None
    records, _ = data.load_split(cfg, "valid")
    template = get_template(cfg.data.template, cfg.data.include_instruction, tok)
    return TaskEvaluator(tok, template, cfg.eval.task, records, cfg.eval.n,
                         cfg.eval.max_new_tokens, cfg.eval.batch_size)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune (or train) a model from a YAML config")
    p.add_argument("config", help="YAML config, e.g. configs/tiny-viggo.yaml")
    p.add_argument("--out", help="run directory (default runs/<config name>); re-running resumes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--restart", action="store_true",
                   help="start over: move an existing run dir aside to <dir>.old-N first")
    distributed.add_arguments(p)
    p.set_defaults(func=main)


def move_aside(run_dir: Path) -> Path | None:
    """Renames an existing run dir to the first free `<name>.old-N` beside it (never deletes)."""
    if not run_dir.exists():
        return None
    n = 1
    while (old := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    if jax.process_index() == 0:
        run_dir.rename(old)
    distributed.barrier(f"moved {run_dir} aside")
    return old


def main(args: argparse.Namespace) -> int:
    distributed.maybe_initialize(args)
    cfg = config_lib.load_config(args.config, args.overrides)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    if args.restart and (old := move_aside(out)):
        print(f"jaxft train: moved the old run to {old}", file=sys.stderr)
    return run(cfg, out)

