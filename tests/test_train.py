"""End-to-end training through the CLI, in subprocesses like a user runs it: loss falls, a run
killed with SIGKILL resumes bit-identically, SIGTERM saves and exits 0, torn checkpoints are
skipped, NaN stops the run, and bad configs fail before anything compiles."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import loss_plot_ok

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-viggo.yaml")
FAST = ["data.limit=400", "train.eval_batches=2", "train.progress=false"]


# Training runs use one CPU device: XLA's in-process all-reduce across simulated devices may
# sum in arrival order, which is not bit-reproducible under load. Sharded training is checked
# against single-device training in test_optim.py and across processes in test_multihost.py.
ONE_DEVICE = {**os.environ, "XLA_FLAGS": ""}


def jaxft(*args, wait=True, env=ONE_DEVICE, **kw):
    cmd = [sys.executable, "-m", "jaxft", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
                          **kw)


def train_args(out, *sets):
    args = ["train", CONFIG, "--out", str(out)]
    for s in (*FAST, *sets):
        args += ["--set", s]
    return args


def metrics(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def final_params(run):
    from jaxft import modeldir, sharding, state
    from jaxft.config import MeshConfig
    cfg = modeldir.read_config(Path(run) / "final")
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    _, abs_state = state.abstract_model(cfg, mesh)
    return jax.device_get(modeldir.load_params(Path(run) / "final", abs_state.to_pure_dict()))


STEPS = ["train.steps=40", "train.ckpt_every=10", "train.eval_every=20", "eval.task=viggo",
         "eval.every=20", "eval.n=4", "eval.max_new_tokens=8", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    r = jaxft(*train_args(out, *STEPS))
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r


def test_loss_falls_by_half_and_val_loss_reported(straight_run):
    out, r = straight_run
    rows = metrics(out)
    train = [x["loss"] for x in rows if x["kind"] == "train"]
    assert len(train) == 40
    assert np.mean(train[-5:]) <= 0.5 * np.mean(train[:3])
    vals = [x for x in rows if x["kind"] == "eval"]
    assert [v["step"] for v in vals] == [20, 40] and all(np.isfinite(v["val_loss"]) for v in vals)
    # the schedule `jaxft.train.eval_steps` states (the demo's tests rely on it) is the loop's
    from jaxft import config as config_lib
    from jaxft.train import eval_steps
    cfg = config_lib.load_config(CONFIG, [*FAST, *STEPS])
    assert eval_steps(cfg.train) == [v["step"] for v in vals]
    assert vals[1]["val_loss"] < vals[0]["val_loss"]
    for v in vals:  # task accuracy on the fixed 4-example subset, beside val loss
        assert v["viggo_strict"] <= v["viggo_exact"] and (v["viggo_exact"] * 4).is_integer()
    for key in ("tokens_seen", "lr", "grad_norm", "tok_s", "mfu"):
        assert key in rows[0]
    # speed is timed over the step itself: a clock read before the step gives MFU far above 1
    assert all(0 < r["mfu"] < 1 for r in rows if r["kind"] == "train")
    assert loss_plot_ok(out / "loss.png")
    assert (out / "best" / "config.json").exists() and (out / "tokenizer").is_dir()
    assert "val loss" in r.stderr and str(out) in r.stderr


def test_kill9_then_resume_is_bit_identical(straight_run, tmp_path):
    out = tmp_path / "run"
    p = jaxft(*train_args(out, *STEPS), wait=False)
    ckpt = out / "ckpt" / "20"
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "final").exists()
    r = jaxft(*train_args(out, *STEPS))
    assert r.returncode == 0, r.stdout + r.stderr
    restored = int(r.stderr.split("resuming at step ")[1].split(";")[0])
    assert 20 <= restored < 40
    ref, got = final_params(straight_run[0]), final_params(out)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        assert np.array_equal(a, b)
    ref_curve = {x["step"]: x["loss"] for x in metrics(straight_run[0]) if x["kind"] == "train"}
    got_curve = {x["step"]: x["loss"] for x in metrics(out) if x["kind"] == "train"}
    assert sorted(got_curve) == list(range(1, 41))  # no repeated or missing steps
    assert all(got_curve[s] == ref_curve[s] for s in range(restored + 1, 41))


def test_sigterm_saves_and_exits_zero(tmp_path):
    out = tmp_path / "run"
    p = jaxft(*train_args(out, "train.steps=400", "train.ckpt_every=5", "train.eval_every=0"),
              wait=False)
    deadline = time.time() + 300
    while not (out / "ckpt" / "5").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 0, log
    assert "SIGTERM" in log
    last = [x["step"] for x in metrics(out) if x["kind"] == "train"][-1]
    assert last < 400
    assert max(int(d.name) for d in (out / "ckpt").iterdir() if d.name.isdigit()) == last


def test_torn_checkpoint_is_skipped(straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    newest = out / "ckpt" / "40"
    for f in (newest / "state").rglob("*"):  # tear the newest checkpoint's array data
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[:100])
    r = jaxft(*train_args(out, *STEPS[1:], "train.steps=45"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "does not restore" in r.stderr and "resuming at step 30" in r.stderr


def _tree_bytes(d: Path) -> dict:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_no_checkpoint_restores_refuses_and_restart_moves_the_run_aside(straight_run, tmp_path):
    """Every checkpoint torn: the run is not silently restarted (metrics, checkpoints, best/
    stay byte-identical); --restart moves it aside whole and starts a new one."""
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    for f in (out / "ckpt").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000 and "state" in f.parts:
            f.write_bytes(f.read_bytes()[:100])
    before = _tree_bytes(out)
    r = jaxft(*train_args(out, *STEPS[1:], "train.steps=45"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "none of its checkpoints restores (step 40: " in r.stderr and "step 30: " in r.stderr
    assert "--restart" in r.stderr and _tree_bytes(out) == before
    r = jaxft(*train_args(out, "train.steps=2", "train.eval_every=0"), "--restart")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"moved the old run to {out}.old-1" in r.stderr and "starting" in r.stderr
    assert _tree_bytes(Path(f"{out}.old-1")) == before
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_rerunning_a_finished_run_changes_nothing(straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    before = _tree_bytes(out)
    r = jaxft(*train_args(out, *STEPS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is finished at step 40 (train.steps=40); nothing to do" in r.stderr
    assert _tree_bytes(out) == before


def test_resume_on_other_data_is_refused(straight_run, tmp_path, data_root):
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    other = tmp_path / "data" / "viggo"
    other.mkdir(parents=True)
    shutil.copy(data_root / "viggo" / "valid.csv", other / "valid.csv")
    rows = (data_root / "viggo" / "train.csv").read_text().splitlines(keepends=True)
    (other / "train.csv").write_text(rows[0] + "".join(reversed(rows[1:])))  # same rows, other order
    before = _tree_bytes(out)
    r = jaxft(*train_args(out, *STEPS[1:], "train.steps=45"),
              env={**ONE_DEVICE, "JAXFT_DATA": str(tmp_path / "data")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "holds a run trained on other data (data.train_file changed" in r.stderr
    assert _tree_bytes(out) == before


def test_a_torn_last_metrics_line_is_skipped_on_resume(straight_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 41, "lo')  # the crash came mid-write
    r = jaxft(*train_args(out, *STEPS[1:], "train.steps=42", "train.eval_every=0"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "metrics.jsonl:" in r.stderr and "not a JSON record" in r.stderr
    steps = [r["step"] for r in metrics(out)]
    assert steps[-2:] == [41, 42] and steps.count(41) == 1


def test_nan_stops_and_reports_step(tmp_path):
    out = tmp_path / "run"
    r = jaxft(*train_args(out, "optim.lr=1e30", "optim.warmup_steps=0", "optim.clip_norm=0",
                          "train.steps=30", "train.ckpt_every=1", "train.eval_every=0"))
    assert r.returncode == 1
    assert "loss is nan at step" in r.stderr or "loss is inf at step" in r.stderr
    bad = int(r.stderr.split(" at step ")[1].split(";")[0])
    kept = sorted(int(d.name) for d in (out / "ckpt").iterdir() if d.name.isdigit())
    assert kept and kept[-1] == bad - 1  # the last good step's checkpoint survives


@pytest.mark.parametrize("sets,expect", [
    (["optim.learning_rate=1"], "valid keys are"),
    (["train.steps=ten"], "train.steps: expected an int"),
    (["mesh.data=3", "mesh.fsdp=1"], "but 8 devices are available"),
    (["data.train_file=viggo/nope.csv"], "nope.csv"),
])
def test_config_errors_fail_before_compiling(tmp_path, sets, expect):
    out = tmp_path / "run"
    r = jaxft(*train_args(out, *sets), env=dict(os.environ))  # the 8-device mesh
    assert r.returncode == 2, r.stdout + r.stderr
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "ckpt").exists()


def test_run_leaves_the_callers_config_and_sigterm_handler_alone(tmp_path, data_root):
    """In-process: the run resolves its own model config (vocab grown to the tokenizer) on a
    copy, and the SIGTERM handler it installs is the caller's again afterwards."""
    import dataclasses
    from jaxft import config as config_lib, train
    cfg = config_lib.load_config(CONFIG, [*FAST, "train.steps=2", "train.eval_every=0",
                                          "train.ckpt_every=0", "data.limit=64"])
    before = dataclasses.asdict(cfg)
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert train.run(cfg, tmp_path / "run") == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert dataclasses.asdict(cfg) == before
    run_vocab = json.loads((tmp_path / "run" / "final" / "config.json").read_text())["vocab_size"]
    assert run_vocab != cfg.model.vocab_size  # the run's copy did change: the tokenizer's vocab


def test_mfu_needs_a_known_device_or_the_env(monkeypatch):
    from jaxft import step
    monkeypatch.delenv("JAXFT_PEAK_FLOPS", raising=False)
    monkeypatch.setattr(step, "PEAK_FLOPS", {"TPU v5": 459e12})  # no entry for this CPU
    assert step.peak_flops() is None
    monkeypatch.setenv("JAXFT_PEAK_FLOPS", "1e12")
    assert step.peak_flops() == 1e12
