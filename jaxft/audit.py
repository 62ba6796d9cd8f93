"""`jaxft audit CONFIG`: shows what the model will be trained on before any compute is spent.

Prints the first N training examples token by token with the trained tokens (loss mask 1)
between `[[` and `]]`, then the data counts of the configured pipeline. Exits with status 1
when a template's prompt does not end on a token boundary for an audited example: the
model would then be trained on token splits it never meets when generating.
"""
from __future__ import annotations

import argparse
import sys

from jaxft.config import at_least, load_config
from jaxft.batches import make_loader
from jaxft.data import build_tokenizer, load_split
from jaxft.chat import get_template
from jaxft.templates import boundary_ok, tokenize_example

OPEN, CLOSE = "[[", "]]"
GREEN, RESET = "\033[32m", "\033[0m"


def render(tok, ids, mask, colour: bool = False) -> str:
    """Token pieces separated by spaces, each run of trained tokens inside [[ ]]."""
    out, inside = [], False
    for i, m in zip(ids, mask):
        if m and not inside:
            out.append(OPEN)
        elif not m and inside:
            out.append(CLOSE)
        inside = bool(m)
        piece = tok.id_to_piece(int(i))
        out.append(f"{GREEN}{piece}{RESET}" if colour and m else piece)
    if inside:
        out.append(CLOSE)
    return " ".join(out)


def audit(cfg, n: int, out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    d = cfg.data
    records, skipped = load_split(cfg, "train")
    tok = build_tokenizer(cfg, records)
    template = get_template(d.template, d.include_instruction, tok)
    colour = out.isatty()
    bad = []
    for k, rec in enumerate(records[:n]):
        ex = tokenize_example(tok, template, rec, train_on=d.train_on)
        print(f"--- example {k + 1} (line {rec.get('line', '?')}): {len(ex['ids'])} ids, "
              f"{int(ex['mask'].sum())} trained", file=out)
        if getattr(template, "is_chat", False):  # one line per turn: role, tokens, mask
            for role, ids, mask in template.turns(tok, rec, d.train_on):
                print(f"  [{role}] {render(tok, ids, mask, colour)}", file=out)
        else:
            print(render(tok, ex["ids"], ex["mask"], colour), file=out)
        if not boundary_ok(tok, template, rec):
            bad.append(rec.get("line", k + 1))
    loader = make_loader(cfg, tok, records, train=True, process_index=0, process_count=1,
                         skipped_empty=skipped)
    s = loader.stats
    print(f"--- {d.train_file}: template {d.template}, padding {d.padding}, "
          f"max_length {d.max_length}, train_on {d.train_on}", file=out)
    rows = [("examples", s.examples), ("tokens", s.tokens), ("target tokens", s.target_tokens),
            ("truncated", s.truncated), ("dropped", s.dropped),
            ("  no target left", s.no_target), ("skipped empty", s.skipped_empty),
            ("padding ratio", f"{s.padding_ratio:.4f}")]
    for name, value in rows:
        print(f"{name + ':':<18}{value}", file=out)
    print(f"(counts from one pass over all {len(records)} training records here; training "
          "itself encodes records lazily, each process only its own shard)", file=out)
    if bad:
        print(f"\n!!! TEMPLATE BOUNDARY ERROR: template {d.template!r} does not end its prompt on "
              f"a token boundary for {len(bad)} of {min(n, len(records))} audited examples "
              f"(lines {', '.join(map(str, bad))}). Encoding prompt + response in one go splits "
              "tokens differently from the prompt alone, so training and generation would see "
              "different tokens. Fix the template (a prompt ending in a space or mid-word is "
              "the usual cause). !!!", file=err)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    return audit(load_config(args.config, args.overrides), args.n)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="show the tokens and loss mask the trainer will use",
                              description=__doc__.split("\n")[0])
    p.add_argument("config", help="YAML config of the run")
    p.add_argument("--n", type=at_least(1), default=3, help="examples to print (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set data.padding=longest (repeatable)")
    p.set_defaults(func=main)
