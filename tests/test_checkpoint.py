"""Run checkpoints: state and data position together, keep-k, a torn step skipped."""
import jax
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.checkpoint import Checkpoints


def _state(x: float):
    return {"params": {"w": jnp.full((4, 3), x)}, "step": jnp.int32(int(x))}


def _abstract():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        _state(0.0))


def test_save_restore_keeps_state_and_data_position(tmp_path):
    ck = Checkpoints(tmp_path / "ckpt", keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(float(step)), {"next_index": step * 10}, wait=True)
    assert ck.steps() == [2, 3]  # keep=2
    step, st, data = ck.restore_latest(_abstract())
    assert step == 3 and data == {"next_index": 30}
    np.testing.assert_array_equal(np.asarray(st["params"]["w"]), np.full((4, 3), 3.0))
    ck.close()


def test_bytes_data_state_round_trips(tmp_path):
    ck = Checkpoints(tmp_path / "ckpt", keep=1)
    ck.save(5, _state(5.0), b"\x00\xffgrain", wait=True)
    assert ck.restore_latest(_abstract())[2] == b"\x00\xffgrain"
    ck.close()


def test_torn_newest_step_falls_back_to_the_one_before(tmp_path, caplog):
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    for step in (1, 2):
        ck.save(step, _state(float(step)), {"i": step}, wait=True)
    ck.close()
    for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every blob
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    with caplog.at_level("WARNING", logger="jaxft"):
        step, st, data = ck.restore_latest(_abstract())
    assert step == 1 and data == {"i": 1}
    np.testing.assert_array_equal(np.asarray(st["params"]["w"]), np.full((4, 3), 1.0))
    assert any("checkpoint step 2" in r.getMessage() for r in caplog.records)
    ck.close()


def _flip_bytes(step_dir, n=32):
    """Flips n bytes in the middle of the step's largest file (silent corruption)."""
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(f.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    f.write_bytes(bytes(raw))


def test_flipped_bytes_fail_the_checksum_and_the_step_is_skipped(tmp_path, caplog):
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    for step in (1, 2):
        ck.save(step, _state(float(step)), {"i": step}, wait=True)
    assert ck.good_steps() == [1, 2] and ck.verify(2) is None
    ck.close()
    _flip_bytes(tmp_path / "ckpt" / "2")
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    assert ck.verify(2).startswith("checksum mismatch in state/")
    with caplog.at_level("WARNING", logger="jaxft"):
        step, _, _ = ck.restore_latest(_abstract())
    assert step == 1 and ck.failures[0][0] == 2 and "checksum mismatch" in ck.failures[0][1]
    assert ck.good_steps() == [1]  # never called good again
    ck.close()


def test_a_step_that_did_not_restore_is_replaced_when_reached_again(tmp_path):
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    for step in (1, 2):
        ck.save(step, _state(float(step)), {"i": step}, wait=True)
    ck.close()
    _flip_bytes(tmp_path / "ckpt" / "2")
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    assert ck.restore_latest(_abstract())[0] == 1
    ck.save(2, _state(7.0), {"i": 7}, wait=True)  # training reached step 2 again
    ck.close()
    ck = Checkpoints(tmp_path / "ckpt", keep=3)
    step, st, data = ck.restore_latest(_abstract())
    assert (step, data) == (2, {"i": 7}) and ck.failures == []
    np.testing.assert_array_equal(np.asarray(st["params"]["w"]), np.full((4, 3), 7.0))
    ck.close()


SAVE_ON_A_FULL_DISK = """
import resource, signal, sys
import jax
import jax.numpy as jnp
from jaxft.checkpoint import Checkpoints
from jaxft.errors import SaveError
ck = Checkpoints(sys.argv[1], keep=2)
ck.save(1, {"w": jnp.zeros((8,))}, {"i": 1}, wait=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # the disk is "full"
try:
    ck.save(2, {"w": jax.random.normal(jax.random.key(0), (1_000_000,))}, {"i": 2}, wait=True)
except SaveError as e:
    print("SAVE ERROR:", e)
"""


def test_a_failed_save_is_one_clear_error_and_deletes_nothing(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", SAVE_ON_A_FULL_DISK, str(tmp_path / "ckpt")],
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("SAVE ERROR:")]
    assert line, r.stdout + r.stderr
    assert f"saving checkpoint step 2 to {tmp_path / 'ckpt'} failed" in line[0]
    assert "File too large" in line[0] and "The last good checkpoint is step 1" in line[0]
    assert "Traceback" not in r.stderr  # one clear line, not Orbax's screens of tracebacks
    ck = Checkpoints(tmp_path / "ckpt", keep=2)
    assert ck.restore_latest({"w": jax.ShapeDtypeStruct((8,), jnp.float32)})[0] == 1
    ck.close()
