"""`make demo`'s schedule and options, without running it (its run is measured in bench/RESULTS.md)."""
from pathlib import Path

import pytest

from jaxft.config import ConfigError
from jaxft.demo import Stages, parse_args, train_config
from jaxft.train import eval_steps


def test_default_schedule_is_55_steps_at_3e4_with_two_val_evals():
    cfg = train_config(parse_args([]), Path("base"))
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.init) == (55, 3e-4, "base")
    assert eval_steps(cfg.train) == [28, 55]
    assert cfg.train.time_limit_s == 0  # the step count bounds the run, not a clock


@pytest.mark.parametrize("steps, want", [(40, [20, 40]), (75, [38, 75]), (1, [1])])
def test_two_val_evals_for_any_step_count(steps, want):
    assert eval_steps(train_config(parse_args(["--steps", str(steps)]), Path("b")).train) == want


def test_lr_and_set_reach_the_training_config():
    args = parse_args(["--lr", "1e-4", "--set", "data.batch_size=2", "--set", "train.keep=2"])
    cfg = train_config(args, Path("b"))
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.train.keep) == (1e-4, 2, 2)


def test_unknown_set_key_names_the_valid_ones():
    with pytest.raises(ConfigError, match="batch_size"):
        train_config(parse_args(["--set", "data.batchsize=2"]), Path("b"))


def test_stage_table_lists_each_stage_and_the_total(capsys):
    stage = Stages()
    with stage("convert"):
        pass
    stage.seconds["fine-tune"] = 100.4
    table = stage.table()
    assert "demo: convert: 0 s" in capsys.readouterr().out
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["convert", "fine-tune", "total"]
    assert table.splitlines()[-1].split()[-2] == "100"
