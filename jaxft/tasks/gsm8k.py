"""GSM8k: grade-school word problems; the answer is worked reasoning ending in `#### N`.

Scoring compares the final number only: the one after the last `####`, else the last number
in the text. Thousands commas, a `$`, a trailing `.0` and the words around it do not matter.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from jaxft.tasks import collect, cut, field, iter_jsonl, record

INSTRUCTION = ("Solve the math word problem below step by step, then give the final answer "
               "as a number on its own line after '#### '.")

# -1,234.50 / $1,234 / 72 ; a comma only counts as a thousands separator in groups of three
_NUMBER = re.compile(r"(-?)\$?\s?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")


ROWS = "jsonl"


def read(path, fields=None) -> tuple[list[dict], int]:
    return collect(path, (to_record(o, path, n) for n, o in iter_jsonl(path)))


def to_record(o: dict, path, n: int, fields=None) -> dict:
    return record("", field(o, "question", path, n), field(o, "answer", path, n), n)


def clean(prediction: str) -> str:
    return cut(prediction)


def final_number(text: str) -> Decimal | None:
    """The number after the last `####`, else the last number in `text`; None if none."""
    head, sep, tail = text.rpartition("####")
    matches = list(_NUMBER.finditer(tail)) if sep else []
    m = matches[0] if matches else None
    if m is None:
        matches = list(_NUMBER.finditer(text))
        m = matches[-1] if matches else None
    if m is None:
        return None
    try:
        return Decimal(m.group(1) + m.group(2).replace(",", "") + (m.group(3) or ""))
    except InvalidOperation:
        return None


def score(prediction: str, rec: dict) -> dict[str, bool]:
    pred, gold = final_number(clean(prediction)), final_number(rec["output"])
    return {"correct": pred is not None and pred == gold}
