"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and the data
iterator's state, saved together, asynchronously, keeping the last k.

Orbax commits a step by renaming a finished temp dir, so a kill mid-save leaves the previous
step intact. A step that still fails to restore (truncated by hand, a bad disk) is skipped with a
warning and the one before it is used.
"""
from __future__ import annotations

import base64
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxft import distributed

log = logging.getLogger("jaxft")


def _encode(data_state):
    if isinstance(data_state, bytes):
        return {"b64": base64.b64encode(data_state).decode()}
    return data_state


def _decode(obj):
    if isinstance(obj, dict) and set(obj) == {"b64"}:
        return base64.b64decode(obj["b64"])
    return obj


def _this_process(data: dict, step: int):
    """This process's saved data state. A run resumed on a different number of processes
    reads the data in other shards, so it takes process 0's position (how far the run got)."""
    if not (isinstance(data, dict) and "per_process" in data):
        return data  # a checkpoint written before per-process states were kept
    states, i, n = data["per_process"], jax.process_index(), jax.process_count()
    if len(states) != n:
        log.warning("checkpoint step %d was written by %d processes and is resumed by %d: each "
                    "process continues from process 0's data position", step, len(states), n)
        return states[0]
    return states[i]


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.dir = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state: dict, data_state, wait: bool = False) -> None:
        """Starts an async save; `wait` blocks until it is committed (end of run, SIGTERM).
        Every process's data-iterator state is kept (each reads its own shard of the data)."""
        per_process = distributed.gather_json(_encode(data_state))
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"per_process": per_process})), force=True)
        if wait:
            self.mngr.wait_until_finished()

    def restore_latest(self, abstract_state: dict):
        """(step, state, data_state) of the newest checkpoint that restores, or None; each
        step that did not restore is in `self.failures` with the reason."""
        self.failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                out = self.mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # a torn checkpoint: fall back to the one before
                self.failures.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
                log.warning("checkpoint step %d in %s does not restore (%s); trying the "
                            "previous one", step, self.dir, self.failures[-1][1])
                continue
            return step, out["state"], _decode(_this_process(out["data"], step))
        return None

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()
