"""Random-access record sources: `source[i]` reads, parses and converts record i on demand.

JSONL (the format that scales) is read lazily through a line-offset index: one pass over the
bytes finds where every non-blank line starts, and the index (16 bytes a line, memory-mapped) is
cached under $JAXFT_CACHE (default ~/.cache/jaxft), keyed by the file's path, size and mtime.
A record is parsed only when the pipeline reaches it, so a malformed line deep in a file is
reported, with file and line, when it is reached. CSV, JSON lists and Parquet are parsed up
front into rows (no tokenising), since they hold no cheap line boundaries; converting a row
into a record still happens on access.

    source = RecordSource("gsm8k", "train.jsonl")
    len(source)   -> 7473        source[5] -> {"instruction", "input", "output", "line"} | None

None is a record a reader skips (no prompt or no response; a chat without an assistant turn).
Sources pickle without their open file, so Grain worker processes can read them.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from jaxft.errors import DataError
from jaxft.tasks import chat, generic, get_task, iter_csv, iter_json_list, usable

INDEX_VERSION = 1
CHUNK_BYTES = 16 << 20  # the index pass reads this much at a time: its memory stays flat
SHORT_LINE = 64  # lines up to this many bytes are checked for being blank
BOM = b"\xef\xbb\xbf"
LAZY = ("found when the pipeline reached this record (JSONL is read lazily, so steps before it "
        "may have run; `jaxft audit` reads the whole file)")


def cache_dir() -> Path:
    return Path(os.environ.get("JAXFT_CACHE") or Path.home() / ".cache" / "jaxft") / "index"


def _newlines(path: str) -> tuple[np.ndarray, int]:
    """Offsets of every b"\\n" in the file, and the file size, reading it in chunks."""
    parts, pos = [], 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            parts.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + pos)
            pos += len(chunk)
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), pos


def build_index(path: str) -> np.ndarray:
    """[n, 2] int64: (byte offset, 1-based line number) of every non-blank line."""
    nl, size = _newlines(path)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    with open(path, "rb") as f:
        if f.read(3) == BOM:
            starts[0] = min(3, ends[0])
        keep = ends > starts
        for k in np.flatnonzero(keep & (ends - starts <= SHORT_LINE)):
            f.seek(starts[k])
            keep[k] = bool(f.read(ends[k] - starts[k]).strip())
    return np.stack([starts[keep], lines[keep]], axis=1)


def load_index(path: str) -> np.ndarray:
    """The cached index of `path`, built and cached first if missing or stale."""
    st = os.stat(path)
    key = f"{INDEX_VERSION}:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    cached = cache_dir() / f"{Path(path).name}.{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"
    if cached.is_file():
        return np.load(cached, mmap_mode="r")
    index = build_index(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Written beside its final name and renamed: processes building at once never see half.
        fd, tmp = tempfile.mkstemp(dir=cached.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, index)
        os.replace(tmp, cached)
    except OSError:
        return index  # an unwritable cache only costs a rebuild next time
    return np.load(cached, mmap_mode="r")


class JsonlRows:
    """rows[i] -> (line number, object) of the i-th non-blank line, parsed on access."""

    listed = False

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: file not found")
        self._index = load_index(self.path)
        self._file = None

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        start, line = (int(x) for x in self._index[i])
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(start)
        raw = self._file.readline()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}:{line}: not UTF-8 text ({e.reason} at byte "
                            f"{start + e.start}); {LAZY}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}:{line}: malformed JSON ({e.msg}, column {e.colno}); "
                            f"{LAZY}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{self.path}:{line}: expected a JSON object, got "
                            f"{type(obj).__name__}; {LAZY}")
        return line, obj

    def __getstate__(self) -> dict:
        # Workers reopen the file and re-map the cached index instead of copying them.
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._file = state["path"], None
        self._index = load_index(self.path)


class ListRows:
    """Rows parsed up front (CSV, JSON lists, Parquet): rows[i] -> (line or index, object)."""

    def __init__(self, rows, listed: bool):
        self._rows = list(rows)
        self.listed = listed

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return self._rows[i]


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(BOM).lstrip()
    return head.startswith(b"[")


def open_rows(kind: str, path):
    """The rows of `path` read as `kind` (csv | jsonl | json_list | chat)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if kind == "csv":
        return ListRows(iter_csv(path), listed=False)
    if kind == "json_list":
        return ListRows(iter_json_list(path), listed=True)
    if kind == "chat" and (path.is_dir() or path.suffix.lower() == ".parquet"):
        it, listed = chat.rows(path)
        return ListRows(it, listed)
    if kind == "chat" and _starts_with_bracket(path):
        return ListRows(iter_json_list(path), listed=True)
    return JsonlRows(path)


class RecordSource:
    """Task `task`'s records of one file, converted from rows on access."""

    def __init__(self, task: str, path, fields: dict | None = None, chat_format: str = "auto"):
        self.task, self.path = task, str(path)
        self._mod = get_task(task)
        kind = task if task in ("csv", "jsonl", "chat") else self._mod.ROWS
        self._rows = open_rows(kind, path)
        if not len(self._rows):
            raise DataError(f"{path}: no records (the file is empty)")
        self._fields = generic.check_fields(path, fields) if task in ("csv", "jsonl") else fields
        self._fmt = None
        if task == "chat":
            n, obj = self._rows[0]
            self._fmt = chat.detect_row(obj, path, n, self._rows.listed, chat_format)

    def __len__(self) -> int:
        return len(self._rows)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_mod"}  # modules do not pickle

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _mod=get_task(state["task"]))

    def __getitem__(self, i: int) -> dict | None:
        n, obj = self._rows[i]
        if self.task == "chat":
            return chat.to_record(obj, self.path, n, self._rows.listed, self._fmt)
        rec = self._mod.to_record(obj, self.path, n, self._fields)
        if not usable(rec):
            return None
        if getattr(self._mod, "INSTRUCTION", "") and self.task not in ("csv", "jsonl"):
            rec["instruction"] = rec["instruction"] or self._mod.INSTRUCTION
        return rec
