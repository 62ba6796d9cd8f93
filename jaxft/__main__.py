"""`jaxft train|eval|generate|convert|plan|audit|lm-eval`: a short entry point; each subcommand's
parser and logic live in its own module, which exposes `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("train", "evaluate", "generate", "convert", "plan", "audit", "lm_eval_cli")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"jaxft.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    from jaxft.config import ConfigError
    from jaxft.judge import JudgeError
    from jaxft.modeldir import OutputExistsError
    from jaxft.tasks import DataError
    from jaxft.templates import TemplateError
    try:
        return args.func(args) or 0
    except (ConfigError, DataError, TemplateError, JudgeError, OutputExistsError,
            FileNotFoundError) as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
