"""Orbax checkpoints of a training run: params, optimizer state, step, RNG and the data
iterator's state, saved together, asynchronously, keeping the last k.

Orbax commits a step by renaming a finished temp dir, so a kill mid-save leaves the previous
step intact. Once a step is committed, each process writes a SHA-256 of every file it can see
in the step (`jaxft_checksums.<process>.json`); a restore checks it first. A step killed between
Orbax's commit and its checksum (a window of one step: `poll`) restores unverified, with a
warning, and is never called good. A step that fails its checksum or fails to restore (truncated, flipped bytes, a bad disk) is skipped with a warning and
the one before it is used; it is replaced when training reaches that step again. A save that
fails (a full disk) stops the run with a SaveError naming the path and the last good step.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxft import distributed
from jaxft.errors import SaveError

log = logging.getLogger("jaxft")


class _OrbaxErrorsOnce(logging.Filter):
    """Orbax logs a failed background save with a traceback from each of its threads (screens
    of them for one full disk); the same failure reaches the caller as one SaveError, or a
    restore warning, so Orbax's own error records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("/orbax/" in record.pathname and record.levelno >= logging.ERROR)


logging.getLogger("absl").addFilter(_OrbaxErrorsOnce())


def _encode(data_state):
    if isinstance(data_state, bytes):
        return {"b64": base64.b64encode(data_state).decode()}
    return data_state


def _decode(obj):
    if isinstance(obj, dict) and set(obj) == {"b64"}:
        return base64.b64decode(obj["b64"])
    return obj


def _this_process(data: dict, step: int):
    """This process's saved data state. Virtual-shard states ({"shards": {...}}) are merged
    over every process, so a resume on another process count finds each shard it now serves
    where it stopped; an older per-process state falls back to process 0's position."""
    if not (isinstance(data, dict) and "per_process" in data):
        return data  # a checkpoint written before per-process states were kept
    states, i, n = data["per_process"], jax.process_index(), jax.process_count()
    sharded = all(isinstance(s, dict) and "shards" in s for s in states)
    if len(states) != n:
        log.warning("checkpoint step %d was written by %d processes and is resumed by %d: %s",
                    step, len(states), n, "every virtual shard continues where it stopped"
                    if sharded else "each process continues from process 0's data position")
    if sharded:
        return {"shards": {k: v for s in states for k, v in s["shards"].items()}}
    return states[0] if len(states) != n else states[i]


def _digests(step_dir: Path) -> dict[str, str]:
    """SHA-256 of every file under a committed step dir (our own checksum files excepted)."""
    out = {}
    for f in sorted(step_dir.rglob("*")):
        if f.is_file() and not f.name.startswith("jaxft_checksums."):
            with f.open("rb") as fh:
                out[str(f.relative_to(step_dir))] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2, async_save: bool = True):
        self.dir = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save))
        self.failures: list[tuple[int, str]] = []  # (step, why) of steps that did not restore
        self._unsummed: list[int] = []  # saved steps whose checksum is not written yet
        self._failed = False  # a save failed: it was reported once, close() stays quiet

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def _checksum_file(self, step: int, process: int | None = None) -> Path:
        p = jax.process_index() if process is None else process
        return self.dir / str(step) / f"jaxft_checksums.{p}.json"

    def good_steps(self) -> list[int]:
        """Committed steps with a checksum written by this process, less those that failed."""
        bad = {s for s, _ in self.failures}
        return [s for s in self.steps() if s not in bad and self._checksum_file(s).is_file()]

    def saved(self, step: int) -> bool:
        """Whether `step` is saved, or being saved, by a good (not torn) checkpoint."""
        return step in self._unsummed or step in self.good_steps()

    def save(self, step: int, state: dict, data_state, wait: bool = False) -> None:
        """Starts an async save; `wait` blocks until it is committed (end of run, SIGTERM).
        Every process's data-iterator state is kept (each reads its own shard of the data).
        A step that did not restore is replaced, not skipped."""
        self._finish_pending()  # the previous save is committed: checksum it
        if step in {s for s, _ in self.failures}:
            log.warning("replacing checkpoint step %d in %s, which did not restore", step, self.dir)
            if jax.process_index() == 0:
                shutil.rmtree(self.dir / str(step), ignore_errors=True)
            distributed.barrier(f"dropped torn step {step}")
            self.mngr.reload()
            self.failures = [(s, w) for s, w in self.failures if s != step]
        per_process = distributed.gather_json(_encode(data_state))
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave({"per_process": per_process})), force=True)
        except Exception as e:
            raise self._save_error(step, e) from None
        self._unsummed.append(step)
        if wait:
            self._finish_pending()

    def _finish_pending(self) -> None:
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # an async save failed (disk full, no permission)
            raise self._save_error(self._unsummed[-1] if self._unsummed else -1, e) from None
        for step in self._unsummed:
            if (self.dir / str(step)).is_dir():
                path = self._checksum_file(step)
                try:
                    path.write_text(json.dumps(_digests(self.dir / str(step)), indent=0))
                except OSError as e:
                    raise self._save_error(step, e) from None
        self._unsummed = []

    def _save_error(self, step: int, e: Exception) -> SaveError:
        self._failed, self._unsummed = True, []
        good = self.good_steps()
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:  # Orbax wraps it
            cause = cause.__cause__ or cause.__context__
        text = str(cause)  # the end of Orbax's message holds the OS error and the byte count
        text = text if len(text) <= 240 else "..." + text[-240:]
        return SaveError(f"saving checkpoint step {step} to {self.dir} failed "
                         f"({type(cause).__name__}: {text}); nothing was deleted. "
                         f"The last good checkpoint is "
                         f"{'step ' + str(good[-1]) if good else 'none'}")

    def verify(self, step: int) -> str | None:
        """None when the step's files match their checksum, "unverified" when the step has
        none (the process died between Orbax's commit and the checksum), else what is wrong."""
        path = self._checksum_file(step)
        if not path.is_file():
            path = self._checksum_file(step, 0)  # resumed on another process count
        if not path.is_file():
            return "unverified"
        want, got = json.loads(path.read_text()), _digests(self.dir / str(step))
        bad = sorted(k for k in want if got.get(k) != want[k])
        return f"checksum mismatch in {', '.join(bad[:3])}" if bad else None

    def poll(self) -> None:
        """Checksums a finished async save now (called every step), so the window in which a
        committed step has no checksum yet is one step long."""
        # Several processes would each decide on their own when the save is done, and waiting
        # may be a collective: there the checksum waits for the next save or the end.
        if self._unsummed and jax.process_count() == 1 and not self.mngr.is_saving_in_progress():
            self._finish_pending()

    def restore_latest(self, abstract_state: dict):
        """(step, state, data_state) of the newest checkpoint that verifies and restores, or
        None; each step that did not is in `self.failures` with the reason."""
        self.failures = []
        for step in reversed(self.steps()):
            try:
                why = self.verify(step)
                if why == "unverified":
                    log.warning("checkpoint step %d in %s has no checksum (the run stopped before "
                                "it was written): restoring it unverified", step, self.dir)
                elif why:
                    raise ValueError(why)
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
        self._finish_pending()

    def close(self) -> None:
        if self._failed:  # already raised once; Orbax would raise the same failure again
            try:
                self.mngr.close()
            except Exception:  # noqa: BLE001 - the SaveError the caller has says it all
                pass
            return
        try:
            self._finish_pending()
        finally:
            self.mngr.close()
