"""What a run shows: a progress bar, `metrics.jsonl`, `loss.png`, optional TensorBoard.
Only process 0 writes; the others get a Report that does nothing."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
import matplotlib
from tqdm import tqdm

log = logging.getLogger("jaxft")


PLAIN_LINES = 20  # without a terminal, about this many progress lines per run


class PlainProgress:
    """The progress bar for a stderr that is not a terminal (CI, `| tee`, a log file): one
    plain line every `every` steps and at the last step, never carriage-return frames."""

    def __init__(self, total: int, start: int, every: int = 0, file=None):
        self.total, self.start, self.file = total, start, file
        self.every = every or max(1, (total - start) // PLAIN_LINES)
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if (step - self.start) % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        print(f"train: step {step}/{self.total} loss {loss:.4f} tok/s {tok_s:,.0f} "
              f"elapsed {elapsed:.0f}s", file=self.file or sys.stderr, flush=True)


class Report:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, progress: bool = True,
                 tensorboard: bool = False):
        self.active = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.plain = None
        self.tb = None
        if not self.active:
            return
        if progress and not sys.stderr.isatty():
            self.plain = PlainProgress(total_steps, start_step)
        elif progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            file=sys.stderr, dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional extra: torch + tensorboard
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume, drops lines logged after the restored step so the curve has no repeats
        (and a line torn by a crash mid-write)."""
        if not self.active or not self.path.exists():
            return
        keep = [json.dumps(r) for r in read_metrics(self.path) if r["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def progress(self, step: int, loss: float, tok_s: float) -> None:
        if self.plain is not None:
            self.plain.update(step, loss, tok_s)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self, plot: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
        if plot and self.active and self.path.exists():
            plot_loss(self.path, self.run_dir / "loss.png")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line that is not a record (torn by a crash while it
    was written) is skipped with a warning naming it."""
    rows = []
    for n, ln in enumerate(Path(path).read_text().splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            log.warning("%s:%d: not a JSON record (a torn write?); skipped", path, n)
    return rows


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """Train and val loss against steps and against tokens seen (ch07's figure, two panels)."""
    matplotlib.use("Agg")  # no display needed; set before pyplot loads
    import matplotlib.pyplot as plt  # late: pyplot picks its backend when first imported

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("kind") == "train" and math.isfinite(r["loss"])]
    val = [r for r in rows if r.get("kind") == "eval" and "val_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x in zip(axes, ("step", "tokens_seen")):
        ax.plot([r[x] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
        if val:
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        ax.set_xlabel("steps" if x == "step" else "tokens seen")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
