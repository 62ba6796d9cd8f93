"""Conversation datasets: OpenAI `messages` or ShareGPT `conversations`, in JSONL, JSON,
Parquet or a Hugging Face `datasets.save_to_disk` directory (read locally with pyarrow).

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...], ...}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...], ...}

The shape is detected per file from its first record (`data.chat_format` forces one). ShareGPT
roles are mapped (human -> user, gpt -> assistant); every other key of a message is kept, and
every other key of a record (`tools`, `documents`, ...) goes to the template untouched. A record
becomes `{"messages", "extra", "file", "line"}`, plus `input` / `output` (its last user and
assistant text) for scoring. Empty conversations and ones without an assistant turn are
skipped and counted. Scoring is whitespace-insensitive exact match on the last reply.
"""
from __future__ import annotations

import json
from pathlib import Path

from jaxft.tasks import DataError, cut, iter_json_list, iter_jsonl, read_text

INSTRUCTION = ""
FORMATS = ("auto", "openai", "sharegpt")
KEYS = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant",
         "system": "system", "bot": "assistant", "model": "assistant"}


def _rows_json(path: Path):
    text = read_text(path)
    if text.lstrip().startswith("["):
        return iter_json_list(path), True
    return iter_jsonl(path), False


def _rows_arrow(path: Path):
    import pyarrow as pa  # pyarrow: only for Parquet / datasets directories
    import pyarrow.parquet as pq  # (same optional dependency)

    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(f"{path}: a DatasetDict; point the file key at one split: "
                            + ", ".join(str(path / s) for s in splits))
        files = sorted(path.glob("data-*.arrow")) or sorted(path.glob("*.arrow"))
        if not files:
            raise DataError(f"{path}: no .arrow files (expected a datasets.save_to_disk directory)")
        tables = []
        for f in files:
            with pa.memory_map(str(f)) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        table = pa.concat_tables(tables)
    else:
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return enumerate(table.to_pylist()), True


def rows(path) -> tuple[object, bool]:
    """(iterator of (line or index, object), whether positions are list indices)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return _rows_arrow(path)
    return _rows_json(path)


def detect(obj: dict, path, where: str, chat_format: str) -> str:
    if chat_format != "auto":
        if chat_format not in KEYS:
            raise DataError(f"data.chat_format={chat_format!r}; choose one of: {', '.join(FORMATS)}")
        return chat_format
    for fmt, (key, _, _) in KEYS.items():
        if key in obj:
            return fmt
    raise DataError(f"{where}: expected a 'messages' (OpenAI) or 'conversations' (ShareGPT) "
                    f"list; the record has keys {sorted(obj)}")


def _messages(obj: dict, fmt: str, where: str) -> list[dict]:
    key, role_key, text_key = KEYS[fmt]
    turns = obj.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: {key!r} must be a list of turns, got "
                        f"{'nothing' if turns is None else type(turns).__name__}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {type(t).__name__}")
        # content may be null only beside tool calls (OpenAI exports write it so)
        no_text = t.get(text_key) is None and not t.get("tool_calls")
        if role_key not in t or no_text:
            missing = role_key if role_key not in t else text_key
            raise DataError(f"{where}: {key}[{i}] has no {missing!r} (it has {sorted(t)})")
        role = t[role_key]
        if not isinstance(role, str):
            raise DataError(f"{where}: {key}[{i}].{role_key} must be text, got {role!r}")
        rest = {k: v for k, v in t.items() if k not in (role_key, text_key)}
        out.append({**rest, "role": ROLES.get(role, role) if fmt == "sharegpt" else role,
                    "content": t[text_key]})
    return out


def _where(path, n: int, listed: bool) -> str:
    return f"{path}: item {n}" if listed else f"{path}:{n}"


def detect_row(obj, path, n: int, listed: bool, chat_format: str) -> str:
    """The file's format, from its first row `obj`."""
    where = _where(path, n, listed)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return detect(obj, path, where, chat_format)


def to_record(obj, path, n: int, listed: bool, fmt: str) -> dict | None:
    """One row as a record; None for a conversation without an assistant turn."""
    where = _where(path, n, listed)
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    messages = _messages(obj, fmt, where)
    if not any(m["role"] == "assistant" for m in messages):
        return None
    extra = {k: v for k, v in obj.items() if k != KEYS[fmt][0]}
    return {"messages": messages, "extra": extra, "file": str(path), "line": n,
            "instruction": "", "input": _last(messages, "user"),
            "output": _last(messages, "assistant")}


def _last(messages, role: str) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m["role"] == role), "")


def read(path, fields=None, chat_format: str = "auto") -> tuple[list[dict], int]:
    """(records, skipped): conversations with an assistant turn, and how many had none."""
    it, listed = rows(path)
    records, skipped, fmt = [], 0, None
    for n, obj in it:
        fmt = fmt or detect_row(obj, path, n, listed, chat_format)
        rec = to_record(obj, path, n, listed, fmt)
        if rec is None:
            skipped += 1  # empty, or nothing to learn from
        else:
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no usable conversations ({skipped} without an assistant turn "
                        "skipped)")
    return records, skipped


def clean(prediction: str) -> str:
    return cut(prediction)


def score(prediction: str, rec: dict) -> dict[str, bool]:
    return {"exact": " ".join(clean(prediction).split()) == " ".join(rec["output"].split())}
