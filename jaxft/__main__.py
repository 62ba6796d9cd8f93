"""`jaxft train|eval|generate|convert|plan|audit|lm-eval`: a short entry point; each
subcommand's parser and logic live in its own module, which exposes `add_parser(subparsers)` and
the handler `main(args)` that the parser is bound to."""
from __future__ import annotations

import argparse
import importlib
import sys

from jaxft.errors import USER_ERRORS

# subcommand -> module under jaxft (`eval` would shadow the builtin as a module name; lm-eval's
# wrapper is light, the harness itself loads only when the command runs)
SUBCOMMANDS = {"train": "train", "eval": "evaluate", "generate": "generate",
               "convert": "convert", "plan": "plan", "audit": "audit", "lm-eval": "lm_eval_cli"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxft", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(f"jaxft.{module}").add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"jaxft {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
