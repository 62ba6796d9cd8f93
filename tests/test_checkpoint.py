"""Run checkpoints: state and data position together, keep-k, a torn step skipped."""
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
