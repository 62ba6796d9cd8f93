"""Progress without a terminal: plain lines every N steps, no carriage-return frames."""
import sys

from jaxft.report import PlainProgress, Report


def test_plain_lines_when_stderr_is_not_a_tty(tmp_path, capsys):
    assert not sys.stderr.isatty()  # pytest captures stderr into a file
    rep = Report(tmp_path, total_steps=40, start_step=0, progress=True)
    assert rep.bar is None and rep.plain is not None and rep.plain.every == 2
    for step in range(1, 41):
        rep.progress(step, 1.0 / step, 123.0)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 20
    assert lines[0].startswith("train: step 2/40 loss 0.5000 tok/s 123 ")
    assert lines[-1].startswith("train: step 40/40 loss 0.0250 ")


def test_plain_every_n_from_a_resumed_step_and_the_last_step(capsys):
    bar = PlainProgress(total=10, start=3, every=3, file=sys.stderr)
    for step in range(4, 11):
        bar.update(step, 2.0, 10.0)
    steps = [ln.split()[2] for ln in capsys.readouterr().err.strip().splitlines()]
    assert steps == ["6/10", "9/10", "10/10"]
