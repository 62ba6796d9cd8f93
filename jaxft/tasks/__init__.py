"""Task readers and metrics.

A reader turns a raw file into records `{"instruction", "input", "output", "line"}`; `line` is the
1-based line (or JSON list index) the record came from, so later errors can point at it. Each
task module exposes `read(path, fields=None) -> (records, skipped)`, `INSTRUCTION`,
`clean(prediction) -> answer` and `score(prediction, record) -> {metric: bool}` (primary first).

The helpers below are shared by the readers: strict decoding, JSONL/CSV iteration that knows
its line numbers, field lookup with clear errors, and the skip/empty-file rules.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
from collections.abc import Iterator
from types import ModuleType

from jaxft.errors import DataError

__all__ = ["DataError", "TASKS", "cut", "cut_at_stop", "get_task", "read_records"]


# task name -> module under jaxft.tasks
TASKS = {"viggo": "viggo", "sql": "sql", "gsm8k": "gsm8k", "alpaca": "instruct",
         "instruct": "instruct", "jsonl": "generic", "csv": "generic", "chat": "chat"}

# Where generated text stops being the answer: the special-token template's end marker, the
# next Alpaca/Phi-3 section, or an end-of-text token the tokenizer decoded as text.
STOPS = ("<END_A>", "\n\n### ", "<|end|>", "<|endoftext|>", "<|im_end|>", "</s>")


def get_task(name: str) -> ModuleType:
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return importlib.import_module(f"jaxft.tasks.{TASKS[name]}")


def read_records(task: str, path: str | os.PathLike, fields: dict | None = None,
                 chat_format: str = "auto") -> tuple[list[dict], int]:
    """Reads `path` with the reader of `task`; returns (records, number of skipped examples).
    Records without an instruction of their own get the task's INSTRUCTION; templates decide
    whether to show it (`include_instruction`)."""
    mod = get_task(task)
    if task in ("jsonl", "csv"):
        return mod.read_format(path, task, fields)
    if task == "chat":
        return mod.read(path, fields, chat_format)
    records, skipped = mod.read(path, fields)
    if getattr(mod, "INSTRUCTION", ""):
        for r in records:
            r["instruction"] = r["instruction"] or mod.INSTRUCTION
    return records, skipped


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return text[: min(ends)] if ends else text


def cut(text: str, stops=STOPS) -> str:
    """The text before the first stop marker, stripped."""
    return cut_at_stop(text, stops).strip()


def read_text(path: str | os.PathLike) -> str:
    """The file as UTF-8 text; bad bytes raise a DataError naming the file and line."""
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_jsonl(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) per non-blank line."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def iter_json_list(path) -> Iterator[tuple[int, dict]]:
    """(list index, object) for a file holding one JSON list of objects."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def iter_csv(path) -> Iterator[tuple[int, dict]]:
    """(first line of the row, {column: value}) per data row; the header is line 1."""
    lines = read_text(path).splitlines(keepends=True)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty CSV file (no header)") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV header ({e})") from None
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:{start}: malformed CSV row ({e})") from None
        if row:  # blank lines
            if len(row) != len(header):
                raise DataError(f"{path}:{start}: expected {len(header)} columns "
                                f"({', '.join(header)}), got {len(row)}")
            yield start, dict(zip(header, row))
        start = reader.line_num + 1


def where(path, line: int, listed: bool = False) -> str:
    return f"{path}: item {line}" if listed else f"{path}:{line}"


def field(obj: dict, name: str, path, line: int, listed: bool = False) -> str:
    """obj[name] as a string; a missing or non-text field names itself, the file and line."""
    if name not in obj:
        raise DataError(f"{where(path, line, listed)}: missing field {name!r}")
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise DataError(f"{where(path, line, listed)}: field {name!r} must be text, "
                        f"got {type(v).__name__}")
    return str(v)


def collect(path, items) -> tuple[list[dict], int]:
    """Keeps records with a prompt and a response; counts the rest. No records left is an error."""
    records, skipped = [], 0
    for r in items:
        if usable(r):
            records.append(r)
        else:
            skipped += 1
    if not records:
        raise DataError(f"{path}: no usable records ({skipped} empty examples skipped)")
    return records, skipped


def usable(r: dict) -> bool:
    """A record needs a prompt (input or instruction) and a response; others are skipped."""
    return bool((r["input"].strip() or r["instruction"].strip()) and r["output"].strip())


def record(instruction: str, input: str, output: str, line: int) -> dict:
    return {"instruction": instruction, "input": input, "output": output, "line": line}
