"""Alpaca-style instruction data (LLMs-from-scratch ch07 `instruction-data.json`).

The file is one JSON list of `{instruction, input, output}`; `line` is the list index. There is
no automatic metric (a judge model scores responses elsewhere); `score` gives only a cheap
whitespace-insensitive exact match.
"""
from __future__ import annotations

import random

from jaxft.tasks import collect, cut, field, iter_json_list, record

INSTRUCTION = ""  # every record carries its own


ROWS = "json_list"


def read(path, fields=None) -> tuple[list[dict], int]:
    return collect(path, (to_record(o, path, i) for i, o in iter_json_list(path)))


def to_record(o: dict, path, i: int, fields=None) -> dict:
    def get(name):
        return field(o, name, path, i, listed=True)
    return record(get("instruction"), get("input"), get("output"), i)


def split_alpaca(records: list, seed: int | None = 0) -> tuple[list, list, list]:
    """(train, val, test) = 85 % / the rest / 10 %, in ch07's order: train first, then test,
    then validation. `seed` shuffles a copy first; None keeps the file order, as ch07 does."""
    recs = list(records)
    if seed is not None:
        random.Random(seed).shuffle(recs)
    n_train, n_test = int(len(recs) * 0.85), int(len(recs) * 0.1)
    train, test = recs[:n_train], recs[n_train:n_train + n_test]
    return train, recs[n_train + n_test:], test


def clean(prediction: str) -> str:
    return cut(prediction)


def score(prediction: str, rec: dict) -> dict[str, bool]:
    return {"exact": " ".join(clean(prediction).split()) == " ".join(rec["output"].split())}
