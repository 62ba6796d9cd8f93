"""What a run shows: metrics lines, the resume cut, the loss plot."""
import json

from conftest import loss_plot_ok

from jaxft.report import Report, plot_loss, read_metrics


def _rows():
    rows = [{"kind": "train", "step": s, "loss": 3.0 / s, "tokens_seen": 100 * s} for s in range(1, 7)]
    return rows + [{"kind": "eval", "step": 3, "tokens_seen": 300, "val_loss": 1.5},
                   {"kind": "eval", "step": 6, "tokens_seen": 600, "val_loss": 1.0}]


def test_log_truncate_after_and_plot(tmp_path):
    rep = Report(tmp_path, total_steps=6, start_step=0, progress=False)
    for r in _rows():
        rep.log(r)
    assert read_metrics(rep.path) == _rows()
    rep.truncate_after(4)  # a resume from step 4 drops what came after it
    assert [r["step"] for r in read_metrics(rep.path)] == [1, 2, 3, 4, 3]
    rep.close()
    assert loss_plot_ok(tmp_path / "loss.png")


def test_plot_skips_non_finite_losses(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            _rows() + [{"kind": "train", "step": 7, "loss": float("nan"), "tokens_seen": 700}]))
    plot_loss(path, tmp_path / "loss.png")
    assert loss_plot_ok(tmp_path / "loss.png")


def test_message_without_bar_goes_to_stderr(tmp_path, capsys):
    Report(tmp_path, 1, 0, progress=False).message("hello run")
    assert capsys.readouterr().err == "hello run\n"
