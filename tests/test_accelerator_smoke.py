"""bench/accelerator.py --smoke: the accelerator benchmark runs end to end on tiny shapes on the
CPU, so the script is known to work before a GPU sees it."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_smoke_runs_and_checks_pass():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--smoke",
                           "--steps", "1"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # No GPU here: cuDNN must be refused and the fallback named, not silently skipped.
    assert "attention: jaxft blocked attention (cuDNN not used:" in out
    table = {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ")}
    for check in ("logits parity vs HF torch, max abs diff", "KV-cache decode == recompute (greedy)",
                  "train-step loss, device vs CPU (bf16)"):
        assert table[check].rstrip().endswith("PASS |"), table[check]
    assert "decode tok/s, batch 4" in out and "fine-tune tok/s" in out
