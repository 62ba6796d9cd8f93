"""Multi-process runs: one JAX process per host (or several on one machine), joined through
the coordinator that process 0 starts.

Every process runs the same `jaxft train` command with its own process id; each feeds only
its shard of the data and the jitted step sees one global batch. A process that dies is
noticed by the others through missed heartbeats: they abort within about HEARTBEAT_S
seconds with JAX's "another task died" error instead of waiting forever in a collective.
On a Cloud TPU pod slice the coordinator, count and ids are found without any flags.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.errors import ConfigError

HEARTBEAT_S = 60  # a process silent this long counts as dead (JAX's default is 100 s)
SHUTDOWN_S = 120  # how long a finished process waits for the others at exit (JAX: 300 s)
CONNECT_S = 300  # how long processes keep trying to reach the coordinator at start

ENV = {"coordinator": "JAXFT_COORDINATOR", "num_processes": "JAXFT_NUM_PROCESSES",
       "process_id": "JAXFT_PROCESS_ID", "heartbeat_s": "JAXFT_HEARTBEAT_S"}


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a multi-process run."""
    coordinator: str  # HOST:PORT of process 0's coordinator service
    num_processes: int
    process_id: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (not needed on a TPU pod slice: detected there)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"address of process 0 for multi-process runs (or ${ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help=f"processes in the run (or ${ENV['num_processes']})")
    g.add_argument("--process-id", type=int, metavar="I",
                   help=f"this process, 0..N-1; 0 runs the coordinator (or ${ENV['process_id']})")
    g.add_argument("--heartbeat-timeout", type=int, metavar="S",
                   help=f"seconds after which a silent process counts as dead and the others "
                        f"stop (default {HEARTBEAT_S}, or ${ENV['heartbeat_s']})")


def _int(value, name: str, flag: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} / ${ENV[name]} must be an integer, got {value!r}") from None


def launch_from(args: argparse.Namespace, env=os.environ) -> Launch | None:
    """The Launch named by the flags (else the JAXFT_* variables); None when neither names a
    coordinator. A coordinator without a process count or id is an error naming what is missing."""
    coord = getattr(args, "coordinator", None) or env.get(ENV["coordinator"])
    n = getattr(args, "num_processes", None)
    i = getattr(args, "process_id", None)
    n = n if n is not None else env.get(ENV["num_processes"])
    i = i if i is not None else env.get(ENV["process_id"])
    if not coord:
        if n is not None or i is not None:
            raise ConfigError(f"--num-processes/--process-id need --coordinator HOST:PORT "
                              f"(or ${ENV['coordinator']})")
        return None
    host, _, port = coord.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coord!r}")
    missing = [f for f, v in (("--num-processes", n), ("--process-id", i)) if v is None]
    if missing:
        raise ConfigError(f"--coordinator {coord} also needs {' and '.join(missing)}")
    n, i = _int(n, "num_processes", "--num-processes"), _int(i, "process_id", "--process-id")
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {i}")
    return Launch(coord, n, i)


def on_tpu_pod() -> bool:
    """True on a Cloud TPU VM that is one worker of a multi-host slice."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("CLOUD_TPU_TASK_ID"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_s: int = HEARTBEAT_S,
               shutdown_s: int = SHUTDOWN_S, connect_s: int = CONNECT_S) -> None:
    """Joins the multi-process run; all None lets JAX detect a TPU pod slice. Must run before
    anything touches a JAX device. CPU processes exchange data through gloo over TCP."""
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process")
    # gloo is the default in jax 0.10; set it anyway so an env override cannot leave CPU
    # processes without cross-process collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            initialization_timeout=connect_s, heartbeat_timeout_seconds=heartbeat_s,
            shutdown_timeout_seconds=shutdown_s)
    except RuntimeError as e:
        if "backend" in str(e).lower() and "initialized" in str(e).lower():
            raise RuntimeError("jaxft.distributed.initialize must run before any JAX "
                               f"computation or device query: {e}") from e
        raise


def maybe_initialize(args: argparse.Namespace, env=os.environ) -> Launch | None:
    """What `jaxft train` calls first: joins the run the flags or JAXFT_* variables describe,
    or the TPU pod slice this VM belongs to; a single process does nothing."""
    launch = launch_from(args, env)
    hb = getattr(args, "heartbeat_timeout", None)
    hb = _int(hb if hb is not None else env.get(ENV["heartbeat_s"], HEARTBEAT_S),
              "heartbeat_s", "--heartbeat-timeout")
    if hb < 1:
        raise ConfigError(f"--heartbeat-timeout must be at least 1 second, got {hb}")
    # A finished process waits for the slowest one; twice the heartbeat bounds that too.
    if launch is not None:
        initialize(launch.coordinator, launch.num_processes, launch.process_id,
                   heartbeat_s=hb, shutdown_s=2 * hb)
    elif on_tpu_pod():
        initialize(heartbeat_s=hb, shutdown_s=2 * hb)
    return launch


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op for one process); e.g. so that others
    read a file only after process 0 has written it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def replicate(x, sharding: jax.sharding.NamedSharding) -> jax.Array:
    """A host value (the same on every process) as one global array with `sharding`, e.g.
    fully replicated: Orbax saves only global arrays in a multi-process run."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def max_over_processes(n: int) -> int:
    """The largest of every process's `n` (one collective: all processes must call it)."""
    if jax.process_count() == 1:
        return n
    return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order, on every process (one collective: all
    processes must call it together)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[: raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(bytes(rows[i, : sizes[i]]).decode()) for i in range(len(sizes))]
