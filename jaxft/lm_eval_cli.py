"""`jaxft lm-eval ARGS...`: lm-eval's own CLI with the jaxft model registered (lm-eval 0.4 finds
external models only through its registry, so something must import `jaxft.lm_eval` first).

    jaxft lm-eval --model_args path=MODEL_DIR,batch_size=16 --tasks arc_easy --limit 100

ARGS are lm-eval's (`lm-eval run --help`); `--model jaxft` is added when no --model is given.
"""
from __future__ import annotations

import argparse
import sys

from jaxft.errors import ConfigError
from jaxft.lm_eval_args import check_model_args


def add_parser(subparsers) -> None:
    # prefix_chars="+": every "--flag" after `lm-eval` is left for lm-eval's parser, not ours.
    p = subparsers.add_parser("lm-eval", prefix_chars="+", add_help=False,
                              help="run lm-evaluation-harness on a jaxft model directory")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=main)


def lm_eval_argv(args: list[str]) -> list[str]:
    """The lm-eval command line: `run` first, and `--model jaxft` unless a model is named."""
    if args and args[0] in ("run", "ls", "validate"):
        cmd, args = args[0], args[1:]
    else:
        cmd = "run"
    named = any(a == "--model" or a.startswith("--model=") for a in args)
    return ["lm-eval", cmd, *([] if named or cmd != "run" else ["--model", "jaxft"]), *args]


def main(args) -> int:
    # lm-eval (and torch, which it imports) is the optional [eval] extra: loaded only here.
    try:
        import jaxft.lm_eval  # noqa: F401  (registers the "jaxft" model)
        from lm_eval._cli import HarnessCLI  # (the same optional extra)
        from lm_eval.utils import setup_logging  # (the same optional extra)
    except ImportError as e:
        raise ConfigError(f"jaxft lm-eval needs lm-eval: pip install 'jaxft[eval]' ({e})") from None
    argv, sys.argv = sys.argv, lm_eval_argv(args.args)
    try:
        setup_logging()
        cli = HarnessCLI()
        ns = cli.parse_args()
        if getattr(ns, "model", None) == "jaxft":
            check_model_args(ns.model_args or {})  # fail now, not after lm-eval indexes its tasks
        cli.execute(ns)
    finally:
        sys.argv = argv
    return 0
