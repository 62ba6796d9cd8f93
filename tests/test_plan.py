"""`jaxft plan` against the bytes a real train state and a real compiled step use on the 8-device
CPU mesh: params and optimizer state exactly, temporaries as the executable that ran reports."""
import dataclasses

import jax
import numpy as np
import pytest

from jaxft import kernels, plan, sharding, state
from jaxft.__main__ import main as cli
from jaxft.config import MeshConfig, OptimConfig, get_preset
from jaxft.optim import make_optimizer
from jaxft.step import compile_train_step, to_global

BATCH, SEQ = 8, 64
MESHES = {"fsdp4_tensor2": MeshConfig(data=1, fsdp=4, tensor=2),
          "data2_fsdp4": MeshConfig(data=2, fsdp=4, tensor=1)}


def bytes_on(tree, device) -> int:
    """Bytes of the shards of every array in `tree` that live on `device`."""
    return sum(s.data.nbytes for a in jax.tree.leaves(tree)
               for s in a.addressable_shards if s.device == device)


@pytest.fixture(scope="module", params=list(MESHES))
def planned_and_live(request):
    """The plan for one mesh, and a real train state + one real step on the same mesh."""
    mesh_cfg = MESHES[request.param]
    planned = plan.plan("tiny", mesh_cfg, BATCH, SEQ, remat="none", dtype="bfloat16")

    cfg = dataclasses.replace(get_preset("tiny"), remat="none", dtype="bfloat16")
    mesh = sharding.make_mesh(mesh_cfg)
    layout = state.make_layout(cfg, mesh, make_optimizer(OptimConfig(), 1000))
    params = state.init_params(layout, seed=0)
    opt = state.init_opt(layout, params)
    devices = list(mesh.devices.flat)
    live = {"params": [bytes_on(params, d) for d in devices],
            "opt": [bytes_on(opt, d) for d in devices]}

    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
    batch = to_global({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                       "loss_mask": np.ones((BATCH, SEQ), np.int32),
                       "segment_ids": np.ones((BATCH, SEQ), np.int32),
                       "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ))},
                      mesh)
    live["batch"] = [bytes_on(batch, d) for d in devices]
    with kernels.kernel_path("accelerator"):  # the program the plan compiles
        compiled = compile_train_step(layout, 1).lower(params, opt, batch).compile()
    old_leaf = jax.tree.leaves(params)[0]
    new_params, new_opt, metrics = compiled(params, opt, batch)
    live["new_params"] = [bytes_on(new_params, d) for d in devices]
    live["new_opt"] = [bytes_on(new_opt, d) for d in devices]
    return {"plan": planned, "live": live, "memory": compiled.memory_analysis(),
            "loss": float(metrics["loss"]), "donated": old_leaf.is_deleted(),
            "mesh": dict(mesh.shape), "rows_per_device": BATCH // (mesh_cfg.data * mesh_cfg.fsdp)}


def test_plan_describes_the_mesh(planned_and_live):
    p = planned_and_live["plan"]
    assert p["mesh"] == planned_and_live["mesh"] and p["devices"] == 8
    assert (p["batch"], p["seq"]) == (BATCH, SEQ)


def test_params_and_optimizer_bytes_equal_live_shards(planned_and_live):
    p, live = planned_and_live["plan"], planned_and_live["live"]
    # Every device holds the planned bytes, before and after a step (out shardings = in).
    for key, planned in (("params", p["params_bytes"]), ("opt", p["opt_bytes"])):
        assert live[key] == [planned] * 8, key
        assert live["new_" + key] == [planned] * 8, key
    # Adam keeps two fp32 moments per fp32 param, plus one replicated int32 step counter.
    assert p["opt_bytes"] == 2 * p["params_bytes"] + 4


def test_temporaries_equal_the_executable_that_ran(planned_and_live):
    mem, p = planned_and_live["memory"], planned_and_live["plan"]
    assert np.isfinite(planned_and_live["loss"])
    assert mem.temp_size_in_bytes == p["temp_bytes"]
    # Temporaries hold at least the fp32 gradient of every param shard.
    assert p["temp_bytes"] > p["params_bytes"]


def test_peak_counts_donated_state_once(planned_and_live):
    """Params and optimizer state are donated and updated in place, so the peak is state +
    batch + temporaries (+ a few bytes of scalar outputs and XLA bookkeeping), not twice the
    state."""
    p, live = planned_and_live["plan"], planned_and_live["live"]
    assert planned_and_live["donated"]
    batch_b = live["batch"][0]
    assert batch_b == 5 * planned_and_live["rows_per_device"] * SEQ * 4
    rest = p["peak_bytes"] - p["params_bytes"] - p["opt_bytes"] - p["temp_bytes"]
    assert batch_b <= rest < batch_b + 4096


@pytest.fixture(scope="module")
def remat_plans():
    """A longer sequence, where saved activations outweigh params and optimizer state."""
    mesh_cfg = MESHES["data2_fsdp4"]
    return {r: plan.plan("tiny", mesh_cfg, BATCH, 256, remat=r) for r in ("none", "full")}


def test_full_remat_cuts_temporaries(remat_plans):
    none, full = remat_plans["none"], remat_plans["full"]
    assert none["temp_bytes"] > 4 * (none["params_bytes"] + none["opt_bytes"])
    assert full["temp_bytes"] < 0.75 * none["temp_bytes"]
    assert full["peak_bytes"] < none["peak_bytes"]
    # Recomputation changes what is kept alive, not what is stored.
    assert (full["params_bytes"], full["opt_bytes"]) == (none["params_bytes"], none["opt_bytes"])


def test_grad_accumulation_cuts_activations():
    """On one device, 4 microbatches of 2 rows keep a quarter of the activations alive (plus
    the gradient accumulator); the stored state is the same."""
    one = MeshConfig(data=1, fsdp=1, tensor=1)
    none, acc = (plan.plan("tiny", one, BATCH, 256, grad_accum=k) for k in (1, 4))
    assert acc["grad_accum"] == 4
    assert acc["temp_bytes"] < 0.6 * none["temp_bytes"]
    assert (acc["params_bytes"], acc["opt_bytes"]) == (none["params_bytes"], none["opt_bytes"])


def test_cli_rejects_grad_accum_that_does_not_divide_the_batch(capsys):
    rc = cli(["plan", "--model", "tiny", "--mesh", "fsdp=1", "--batch", "6", "--grad-accum", "4"])
    assert rc == 2 and "--batch=6 must be divisible by --grad-accum (4)" in capsys.readouterr().err


@pytest.mark.parametrize("mesh_text", ["fsdp=four", "fsdp=0", "tensor=-2", "pipeline=2",
                                       "fsdp", "fsdp=4,data=x"])
def test_cli_rejects_bad_mesh_text(mesh_text, capsys):
    rc = cli(["plan", "--model", "tiny", "--mesh", mesh_text])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--mesh {mesh_text!r}" in err and "expected axis=N with axes data, fsdp, tensor" in err


def test_cli_rejects_unknown_preset(capsys):
    rc = cli(["plan", "--model", "llama9-1t", "--mesh", "fsdp=8"])
    assert rc == 2 and "unknown model preset 'llama9-1t'" in capsys.readouterr().err
