"""`jaxft train CONFIG [--out DIR] [--set key=value ...]`: the full-parameter training loop.

The train step is a module-level pure function of (params, opt_state, batch), jitted once with
in/out shardings and donation. Re-running the same command resumes from the run directory.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from jaxft import checkpoint, config as config_lib, data, distributed, modeldir, sharding, state
from jaxft.config import Config, ConfigError
from jaxft.loss import batch_loss_sum
from jaxft.model import param_count
from jaxft.optim import make_optimizer, schedule
from jaxft.report import Report, read_metrics

# Keys that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = {"train.steps", "train.time_limit_s", "train.progress", "train.log_every",
                     "train.eval_every", "train.tensorboard", "train.patience", "eval.every"}

# Peak dense FLOP/s per device, for the MFU estimate ($JAXFT_PEAK_FLOPS overrides).
PEAK_FLOPS = {"cpu": 175e9,  # measured fp32 matmul peak of the 2-core dev machine
              "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v4": 275e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12}


def train_step(graphdef, tx, grad_accum: int, mesh, params, opt_state, batch):
    """One optimizer step. The loss is the masked mean over every target token of the global
    batch (all microbatches together), not a mean of per-example means."""
    with sharding.activation_mesh(mesh):
        return _train_step(graphdef, tx, grad_accum, params, opt_state, batch)


def _train_step(graphdef, tx, grad_accum: int, params, opt_state, batch):
    grad_fn = jax.value_and_grad(
        lambda p, mb: batch_loss_sum(nnx.merge(graphdef, p), mb), has_aux=True)
    if grad_accum == 1:
        (loss_sum, n_tok), grads = grad_fn(params, batch)
    else:
        # Rows are split [B] -> [B/k, k] so each device's microbatch slice stays local.
        mbs = jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum,
                                               *x.shape[1:]).swapaxes(0, 1), batch)

        def body(carry, mb):
            (l, n), g = grad_fn(params, mb)
            return jax.tree.map(jnp.add, carry, (l, n, g)), None

        zero = (jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, n_tok, grads), _ = jax.lax.scan(body, zero, mbs)
    n = jnp.maximum(n_tok, 1.0)
    grads = jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss_sum / n, "tokens": n_tok,
                               "grad_norm": optax.tree.norm(grads)}


def compile_train_step(layout: state.Layout, grad_accum: int):
    batch_sh = sharding.batch_sharding(layout.mesh)
    step = lambda p, o, b: train_step(layout.graphdef, layout.tx, grad_accum, layout.mesh,  # noqa: E731
                                      p, o, b)
    return jax.jit(step, in_shardings=(layout.params_sh, layout.opt_sh, batch_sh),
                   out_shardings=(layout.params_sh, layout.opt_sh, None), donate_argnums=(0, 1))


def compile_eval_step(layout: state.Layout):
    batch_sh = sharding.batch_sharding(layout.mesh)
    def eval_step(p, b):
        with sharding.activation_mesh(layout.mesh):
            return batch_loss_sum(nnx.merge(layout.graphdef, p), b)

    return jax.jit(eval_step, in_shardings=(layout.params_sh, batch_sh))


def to_global(batch: dict, mesh) -> dict:
    """Each process's rows become one global array sharded over the data axes. Rows padded to
    each process's own longest (`padding: longest`) are first padded to the widest of them: zeros
    are padding, segment 0 with no loss, so the extra columns change nothing."""
    width = distributed.max_over_processes(max(v.shape[1] for v in batch.values()))
    batch = {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) if v.shape[1] < width else v
             for k, v in batch.items()}
    sh = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul param plus attention scores (PaLM appendix B)."""
    n = param_count(cfg) - cfg.vocab_size * cfg.dim * (1 if not cfg.tie_embeddings else 0)
    return 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len


def peak_flops() -> float:
    if os.environ.get("JAXFT_PEAK_FLOPS"):
        return float(os.environ["JAXFT_PEAK_FLOPS"])
    kind = jax.devices()[0].device_kind
    for name, v in PEAK_FLOPS.items():
        if name.lower() in kind.lower() or jax.devices()[0].platform == name:
            return v
    return PEAK_FLOPS["cpu"]


def eval_loss(eval_step, params, loader, mesh, max_batches: int) -> float:
    total = count = 0.0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        s, n = eval_step(params, to_global(batch, mesh))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling" and k != "fields":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    saved_path = run_dir / "config.yaml"
    new = config_lib.to_dict(cfg)
    if saved_path.exists():
        old = _flat(yaml.safe_load(saved_path.read_text()))
        diff = sorted(k for k, v in _flat(new).items()
                      if old.get(k) != v and k not in RESUMABLE_CHANGES)
        if diff:
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({', '.join(diff)} differ); "
                f"use another --out, or resume with the same config")
    if jax.process_index() == 0:
        saved_path.write_text(yaml.safe_dump(new, sort_keys=False))


class _Stop:
    """SIGTERM (TPU preemption) asks the loop to save at the next step boundary and exit 0."""
    requested = False

    def __call__(self, signum, frame):
        _Stop.requested = True


def run(cfg: Config, run_dir: str | Path) -> int:
    run_dir = Path(run_dir)
    mesh = sharding.make_mesh(cfg.mesh)  # a mesh/device mismatch fails before any compile
    n_dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % (n_dp * cfg.optim.grad_accum):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by data*fsdp "
                          f"({n_dp}) times optim.grad_accum ({cfg.optim.grad_accum})")
    train_records, _ = data.load_split(cfg, "train")
    valid_records = data.load_split(cfg, "valid")[0] if cfg.train.eval_every else []
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = run_dir / "tokenizer"
    if tok_dir.is_dir():
        from jaxft.tokenizer import load_tokenizer
        tok = load_tokenizer(tok_dir)
    else:
        tok = data.build_tokenizer(cfg, train_records)
        if jax.process_index() == 0:
            tok.save(tok_dir)
    distributed.barrier("tokenizer saved")  # the others may read tok_dir on a resume
    mcfg = state.model_config(cfg, len(tok))
    cfg.model = mcfg
    check_resume_config(run_dir, cfg)

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    lr_at = schedule(cfg.optim, cfg.train.steps)
    layout = state.make_layout(mcfg, mesh, tx)
    loader = data.make_loader(cfg, tok, train_records, train=True)
    ckpts = checkpoint.Checkpoints(run_dir / "ckpt", keep=cfg.train.keep)
    rep = sharding.replicated(mesh)
    abstract = {"params": layout.abs_params, "opt": layout.abs_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}
    restored = ckpts.restore_latest(abstract)
    if restored:
        step, st, data_state = restored
        params, opt_state, rng = st["params"], st["opt"], st["rng"]
        loader.set_state(data_state)
    else:
        step = 0
        rng = distributed.replicate(jax.random.key_data(jax.random.PRNGKey(cfg.train.seed)), rep)
        params = (state.pretrained_params(cfg.train.init, mcfg, mesh, layout.params_sh)
                  if cfg.train.init else state.init_params(layout, cfg.train.seed))
        opt_state = state.init_opt(layout, params)

    report = Report(run_dir, cfg.train.steps, step, cfg.train.progress, cfg.train.tensorboard)
    report.truncate_after(step)
    history = read_metrics(report.path) if report.path.exists() else []
    vals = [r["val_loss"] for r in history if r.get("kind") == "eval" and "val_loss" in r]
    best, since_best = (min(vals), len(vals) - 1 - int(np.argmin(vals))) if vals else (math.inf, 0)
    tokens_seen = max([r.get("tokens_seen", 0) for r in history] or [0])
    report.message(f"jaxft: {param_count(mcfg) / 1e6:.1f}M params on mesh {dict(mesh.shape)}; "
                   f"{'resuming at step ' + str(step) if restored else 'starting'}; run dir {run_dir}")

    step_fn = compile_train_step(layout, cfg.optim.grad_accum)
    eval_fn = compile_eval_step(layout) if cfg.train.eval_every else None
    # Encoded once; each iteration of an eval loader is a fresh in-order pass.
    vloader = data.make_loader(cfg, tok, valid_records, train=False) if eval_fn else None
    task_eval = _task_evaluator(cfg, tok)
    signal.signal(signal.SIGTERM, _Stop())
    fpt, peak = flops_per_token(mcfg, cfg.data.max_length), peak_flops() * jax.device_count()

    def save(wait=False):
        if step in ckpts.steps():  # already saved at this step (e.g. ckpt_every hit the end)
            return ckpts.wait() if wait else None
        ckpts.save(step, {"params": params, "opt": opt_state, "rng": rng,
                          "step": distributed.replicate(np.int32(step), rep)},
                   loader.get_state(), wait=wait)

    last_eval = -1

    def evaluate():
        nonlocal best, since_best, last_eval
        last_eval = step
        rec = {"kind": "eval", "step": step, "tokens_seen": tokens_seen}
        if eval_fn is not None:
            rec["val_loss"] = eval_loss(eval_fn, params, vloader, mesh, cfg.train.eval_batches)
        if task_eval is not None and cfg.eval.every and step % cfg.eval.every == 0:
            rec.update(task_eval.run(nnx.merge(layout.graphdef, params)))
        report.log(rec)
        report.message("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in rec.items() if k != "kind"))
        if rec.get("val_loss", math.inf) < best:
            best, since_best = rec["val_loss"], 0
            modeldir.save_model(run_dir / "best", nnx.merge(layout.graphdef, params), tok, force=True)
        elif "val_loss" in rec:
            since_best += 1

    it = iter(loader)
    t_last, status, last_loss = time.perf_counter(), 0, float("nan")
    t_start = time.perf_counter()
    while step < cfg.train.steps:
        batch = next(it)
        nonpad = int(np.count_nonzero(batch["segment_ids"])) * jax.process_count()
        params, opt_state, m = step_fn(params, opt_state, to_global(batch, mesh))
        loss = float(m["loss"])
        step += 1
        if not math.isfinite(loss):
            good = ckpts.steps()
            report.message(f"jaxft: loss is {loss} at step {step}; stopping. The last good "
                           f"checkpoint is {'step ' + str(good[-1]) if good else 'none'} in {ckpts.dir}")
            status = 1
            break
        last_loss = loss
        tokens_seen += int(m["tokens"])
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rows = batch["inputs"].size * jax.process_count()
            report.log({"kind": "train", "step": step, "loss": loss, "tokens": int(m["tokens"]),
                        "tokens_seen": tokens_seen, "lr": float(lr_at(step - 1)),
                        "grad_norm": float(m["grad_norm"]), "tok_s": nonpad / dt,
                        "mfu": fpt * rows / dt / peak})
        report.progress(step, loss, nonpad / dt)
        if cfg.train.eval_every and step % cfg.train.eval_every == 0:
            evaluate()
            if cfg.train.patience and since_best >= cfg.train.patience:
                report.message(f"jaxft: early stop at step {step}: no val improvement in "
                               f"{since_best} evals (best {best:.4f})")
                break
        if _Stop.requested:
            save(wait=True)
            report.message(f"jaxft: SIGTERM: saved step {step} to {ckpts.dir}; exiting")
            ckpts.close()
            report.close()
            return 0
        if cfg.train.time_limit_s and now - t_start > cfg.train.time_limit_s:
            report.message(f"jaxft: time limit {cfg.train.time_limit_s:.0f}s reached at step {step}")
            break
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
            save()
    if status == 0:
        if cfg.train.eval_every and last_eval != step:
            evaluate()
        save(wait=True)
        modeldir.save_model(run_dir / "final", nnx.merge(layout.graphdef, params), tok, force=True)
    ckpts.close()
    report.close()
    if status == 0:
        report.message(f"jaxft: done at step {step}: train loss {last_loss:.4f}"
                       + (f", best val loss {best:.4f}" if math.isfinite(best) else "")
                       + f". Outputs in {run_dir}: metrics.jsonl, loss.png, final/"
                       + (", best/" if math.isfinite(best) else ""))
    return status


def _task_evaluator(cfg: Config, tok):
    if not (cfg.eval.task and cfg.eval.every):
        return None
    from jaxft.evaluate import TaskEvaluator
    from jaxft.chat import get_template
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
    distributed.add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    distributed.maybe_initialize(args)
    cfg = config_lib.load_config(args.config, args.overrides)
    out = args.out or str(Path("runs") / Path(args.config).stem)
    return run(cfg, out)


if __name__ == "__main__":
    from jaxft.__main__ import main as cli
    sys.exit(cli(["train", *sys.argv[1:]]))
