"""ViGGO: video-game sentences -> meaning representations `fn(attr[value], attr[v1, v2])`.

The CSV has columns `mr` (target) and `ref` (the sentence, our input). Scoring parses both
representations: `exact` wants the same function and the same attribute -> value set (values
compared case- and space-insensitively, list items in any order); `strict` also wants the
attributes in the gold order. A prediction that does not parse is wrong.
"""
from __future__ import annotations

import re

from jaxft.tasks import collect, cut, field, iter_csv, record

# Checked against viggo/train.csv and valid.csv: exactly these occur.
FUNCTIONS = ("inform", "request", "give_opinion", "confirm", "verify_attribute", "suggest",
             "request_explanation", "recommend", "request_attribute")
ATTRIBUTES = ("name", "release_year", "esrb", "genres", "platforms", "available_on_steam",
              "has_linux_release", "has_mac_release", "specifier", "rating",
              "player_perspective", "has_multiplayer", "developer", "exp_release_date")

INSTRUCTION = (
    "Write the meaning representation of the sentence below as one function call with "
    "attributes, like fn(attr[value], attr[value1, value2]). The function is one of: "
    + ", ".join(FUNCTIONS) + ". The attributes are chosen from: " + ", ".join(ATTRIBUTES)
    + ". Keep only what the sentence says.")


ROWS = "csv"


def read(path, fields=None) -> tuple[list[dict], int]:
    return collect(path, (to_record(r, path, n) for n, r in iter_csv(path)))


def to_record(r: dict, path, n: int, fields=None) -> dict:
    return record("", field(r, "ref", path, n), field(r, "mr", path, n), n)


def clean(prediction: str) -> str:
    """The representation is one line: cut at a stop marker, then at the first newline."""
    text = cut(prediction)
    return text.split("\n", 1)[0].strip()


_CALL = re.compile(r"\s*(\w+)\s*\((.*)\)\s*", re.S)
_ATTR = re.compile(r"\s*(\w+)\s*\[([^\[\]]*)\]\s*(,|$)")


def parse(mr: str) -> tuple[str, list[tuple[str, tuple[str, ...]]]] | None:
    """`fn(a[x], b[y, z])` -> ("fn", [("a", ("x",)), ("b", ("y", "z"))]) with values
    normalised (lower case, single spaces, list items sorted); None if malformed."""
    m = _CALL.fullmatch(mr)
    if not m:
        return None
    body, attrs, pos = m.group(2), [], 0
    while pos < len(body.rstrip()):
        a = _ATTR.match(body, pos)
        if not a:
            return None
        items = (" ".join(v.lower().split()) for v in a.group(2).split(","))
        attrs.append((a.group(1), tuple(sorted(v for v in items if v))))
        pos = a.end()
    return m.group(1).lower(), attrs


def score(prediction: str, rec: dict) -> dict[str, bool]:
    pred, gold = parse(clean(prediction)), parse(rec["output"])
    if pred is None or gold is None or pred[0] != gold[0]:
        return {"exact": False, "strict": False}
    exact = sorted(pred[1]) == sorted(gold[1])
    return {"exact": exact, "strict": exact and pred[1] == gold[1]}
