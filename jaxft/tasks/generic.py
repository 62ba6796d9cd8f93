"""Any JSONL or CSV file, given which columns hold the instruction, input and output.

`fields` maps {"instruction": column, "input": column, "output": column}; a role left out
(usually the instruction) reads as empty text. Scoring is whitespace-insensitive exact match.
"""
from __future__ import annotations

from pathlib import Path

from jaxft.tasks import DataError, collect, cut, field, iter_csv, iter_jsonl, record

INSTRUCTION = ""
ROLES = ("instruction", "input", "output")


def read(path, fields=None) -> tuple[list[dict], int]:
    """Reads by file suffix: .csv as CSV, anything else as JSONL."""
    return read_format(path, "csv" if Path(path).suffix.lower() == ".csv" else "jsonl", fields)


def read_format(path, fmt: str, fields: dict | None) -> tuple[list[dict], int]:
    fields = check_fields(path, fields)
    rows = iter_csv(path) if fmt == "csv" else iter_jsonl(path)
    return collect(path, (to_record(o, path, n, fields) for n, o in rows))


def check_fields(path, fields: dict | None) -> dict:
    fields = dict(fields or {})
    unknown = set(fields) - set(ROLES)
    if unknown or "output" not in fields or not ({"input", "instruction"} & set(fields)):
        raise DataError(f"{path}: data.fields must map output and input (or instruction) to "
                        f"columns, with keys from {', '.join(ROLES)}; got {fields}")
    return fields


def to_record(o: dict, path, n: int, fields: dict) -> dict:
    def get(role):
        return field(o, fields[role], path, n) if fields.get(role) else ""
    return record(get("instruction"), get("input"), get("output"), n)


def clean(prediction: str) -> str:
    return cut(prediction)


def score(prediction: str, rec: dict) -> dict[str, bool]:
    return {"exact": " ".join(clean(prediction).split()) == " ".join(rec["output"].split())}
