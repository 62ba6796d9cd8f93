"""Text-to-SQL: WikiSQL lines `{"text": "table: T\\ncolumns: a, b\\nQ: ...\\nA: SQL"}` or
sql-create-context records `{question, context, answer}`.

The input keeps the schema lines (or CREATE TABLE statements) and the question, so scoring can
rebuild the table. `exact` compares normalised text (whitespace, case outside literals, a
trailing semicolon, quote style). `execution` runs both queries in an in-memory SQLite table
filled with rows made from the gold query's literals plus distractors, and compares result
multisets. WikiSQL writes column names bare (`SELECT COUNT No. FROM 1-100-1 WHERE Player =
'Patrick O'Bryant'`), so queries are rewritten first: known names quoted, longest first.
"""
from __future__ import annotations

import re
import sqlite3
from collections import Counter

from jaxft.tasks import DataError, collect, field, iter_jsonl, record, STOPS

INSTRUCTION = ("Write one SQL query that answers the question about the table below, using "
               "the table and column names exactly as given.")


ROWS = "jsonl"


def read(path, fields=None) -> tuple[list[dict], int]:
    return collect(path, (to_record(o, path, n) for n, o in iter_jsonl(path)))


def to_record(o: dict, path, n: int, fields=None) -> dict:
    if "text" not in o and "context" in o:  # sql-create-context
        q, ctx = field(o, "question", path, n), field(o, "context", path, n)
        return record("", f"{ctx.strip()}\nQ: {q.strip()}", field(o, "answer", path, n), n)
    text = field(o, "text", path, n)
    prompt, sep, answer = text.rpartition("\nA:")
    if not sep or not prompt.startswith("table:") or "\ncolumns:" not in prompt:
        raise DataError(f"{path}:{n}: field 'text' needs 'table:', 'columns:', 'Q:' and 'A:' lines")
    return record("", prompt.strip(), answer.strip(), n)


def clean(prediction: str) -> str:
    """The query: cut at a stop marker, a blank line or a new prompt section (`Q: ...`)."""
    for s in STOPS:
        prediction = prediction.split(s, 1)[0]
    return re.split(r"\n\s*\n|\n\s*\w+:", prediction.strip(), maxsplit=1)[0].strip()


# A quote closes a literal only before the end, a separator or a keyword: WikiSQL leaves
# inner quotes unescaped ('Patrick O'Bryant').
_CLOSES = re.compile(r"\s*($|[),;=<>]|(AND|OR|ORDER|GROUP|LIMIT|UNION|FROM|WHERE|AS|ON|JOIN|HAVING"
                     r"|INNER|LEFT|IN|IS|NOT|LIKE|BETWEEN|ASC|DESC)\b)", re.I)


def split_literals(sql: str) -> list[tuple[str, str]]:
    """[(quote, text)]: quote is ' or " for a quoted part (text unquoted), "" for code."""
    parts, code, i = [], [], 0
    while i < len(sql):
        q = sql[i]
        if q not in "'\"":
            code.append(q)
            i += 1
            continue
        j, end = i + 1, -1
        while j < len(sql):
            if sql[j] == q and sql[j + 1:j + 2] == q:
                j += 2
            elif sql[j] == q and _CLOSES.match(sql, j + 1):
                end = j
                break
            else:
                j += 1
        if end < 0:  # never properly closed: take the last quote, else the rest
            end = sql.rfind(q) if sql.rfind(q) > i else len(sql)
        parts += [("", "".join(code)), (q, sql[i + 1:end].replace(q + q, q))]
        code, i = [], end + 1
    parts.append(("", "".join(code)))
    return [(q, t) for q, t in parts if q or t]


def normalize(sql: str) -> str:
    """Whitespace, case outside literals, a trailing ';' and the quote style do not matter."""
    out = []
    for quote, text in split_literals(sql.strip().rstrip(";")):
        out.append("'" + text + "'" if quote else re.sub(r"([(),=<>;*])", r" \1 ", text.lower()))
    return " ".join(" ".join(out).split()).rstrip(" ;")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# What dataset text and generated queries may do in sqlite: define tables, fill them, read them.
_ALLOWED = {sqlite3.SQLITE_CREATE_TABLE, sqlite3.SQLITE_INSERT, sqlite3.SQLITE_SELECT,
            sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE,
            sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_UPDATE}
BUDGET = 2000  # progress-handler calls (x1000 VM instructions) a connection may spend


def _authorize(action, arg1, arg2, db_name, trigger):
    if action == sqlite3.SQLITE_PRAGMA and arg1 == "table_info":
        return sqlite3.SQLITE_OK
    if action not in _ALLOWED or (action == sqlite3.SQLITE_FUNCTION and arg2 == "load_extension"):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_UPDATE and arg1 != "sqlite_master":  # only CREATE's own bookkeeping
        return sqlite3.SQLITE_DENY
    if db_name not in (None, "main"):
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def sandbox() -> sqlite3.Connection:
    """An in-memory database for untrusted SQL: no ATTACH (so no file is ever opened), no
    extensions, only CREATE TABLE / INSERT / SELECT, and a bounded number of VM steps."""
    db = sqlite3.connect(":memory:")
    db.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    if hasattr(db, "enable_load_extension"):  # absent where Python was built without it
        db.enable_load_extension(False)
    db.set_authorizer(_authorize)
    steps = [0]

    def budget():
        steps[0] += 1
        return steps[0] > BUDGET
    db.set_progress_handler(budget, 1000)
    return db


def schema(rec_input: str, gold: str = "") -> tuple[list[str], dict[str, list[str]]]:
    """(DDL statements, {table: columns}) from a record's input. WikiSQL column names may hold
    ", " themselves: neighbours whose joined name occurs in the `gold` query are merged."""
    if "CREATE TABLE" in rec_input.upper():
        db = sandbox()
        try:
            ddl = [s.strip() for s in rec_input.split("\nQ:")[0].split(";") if s.strip()]
            for s in ddl:
                db.execute(s)
            names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            return ddl, {t: [r[1] for r in db.execute(f"PRAGMA table_info({_quote(t)})")]
                         for t in names}
        finally:
            db.close()
    lines = dict(ln.split(":", 1) for ln in rec_input.splitlines() if ":" in ln)
    table = lines.get("table", "").strip()
    cols = [c.strip() for c in lines.get("columns", "").split(",") if c.strip()]
    code = " ".join(t for quote, t in split_literals(gold) if not quote)
    i = 0
    while i < len(cols):
        for j in range(min(len(cols), i + 6), i + 1, -1):
            if ", ".join(cols[i:j]) in code:
                cols[i:j] = [", ".join(cols[i:j])]
                break
        i += 1
    cols = list(dict.fromkeys(cols))
    # NUMERIC: '6' and 6 compare equal; NOCASE: WikiSQL's own evaluation ignores case
    ddl = [f"CREATE TABLE {_quote(table)} ("
           + ", ".join(f"{_quote(c)} NUMERIC COLLATE NOCASE" for c in cols) + ")"]
    return ddl, {table: cols}


def to_sqlite(sql: str, names: list[str]) -> str:
    """Quotes known table/column names (longest first) and literals; `COUNT x` -> COUNT(x)."""
    known = {n.lower() for n in names}
    alt = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    name_re = re.compile(rf"(?<![\w\"])({alt})(?![\w\"])", re.I) if alt else None
    out = []
    for quote, text in split_literals(sql.strip().rstrip(";")):
        if quote == '"' and text.lower() in known:  # an identifier, not a string
            out.append(_quote(text))
        elif quote:
            out.append("'" + text.replace("'", "''") + "'")
        else:
            out.append(name_re.sub(lambda m: _quote(m.group(1)), text) if name_re else text)
    query = " ".join(out)
    return re.sub(r"\b(COUNT|MIN|MAX|SUM|AVG)\s+(\"(?:[^\"]|\"\")+\")", r"\1(\2)", query, flags=re.I)


_COND = re.compile(r"\"((?:[^\"]|\"\")+)\"\s*(=|<=|>=|<>|!=|<|>)\s*('(?:[^']|'')*'|-?\d+(?:\.\d+)?)")


def _num(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def _satisfy(op: str, v: str, k: int):
    """A value for which `col op v` holds; k = 0, 1 gives two different ones for ranges."""
    n = _num(v)
    if op in ("=", "<=", ">="):
        return v
    if op in (">",):
        return n + 1 + k if n is not None else v + "~" * (k + 1)
    if op == "<":
        return n - 1 - k if n is not None else ""
    return v + " (other)"  # != / <>


def _violate(op: str, v: str):
    """A value for which `col op v` fails; for ranges, the nearest one (catches > vs >=)."""
    n = _num(v)
    if op == "=":
        return n + 1000 if n is not None else v + " (other)"
    if op in (">", "<"):
        return v
    if op == ">=":
        return n - 1 if n is not None else ""
    if op == "<=":
        return n + 1 if n is not None else v + "~"
    return v


def fill(db: sqlite3.Connection, tables: dict[str, list[str]], gold: str) -> None:
    """Rows from the gold query's conditions: two that satisfy all of them, two per condition
    that break only it, and one with the literals moved to the other columns. Filler values
    grow with the row and each condition is broken once below and once above the matching
    rows, so a dropped condition changes MIN and MAX as well as COUNT."""
    conds = [(c.replace('""', '"').lower(), op, v[1:-1].replace("''", "'") if v[0] == "'" else v)
             for c, op, v in _COND.findall(gold)]
    cond_cols = {c for c, _, _ in conds}
    for table, cols in tables.items():
        def row(r: int, broken: int = -1, moved: bool = False):
            vals = {c.lower(): r * 100 + i for i, c in enumerate(cols)}
            for k, (c, op, v) in enumerate(conds):
                if moved:  # the literal sits in the columns the query does not test
                    vals.update({o: v for o in vals if o not in cond_cols})
                elif c in vals:
                    vals[c] = _violate(op, v) if k == broken else _satisfy(op, v, r % 2)
            return [vals[c.lower()] for c in cols]
        n = len(conds)
        rows = ([row(k, broken=k) for k in range(n)] + [row(n), row(n + 1)]
                + [row(n + 2 + k, broken=k) for k in range(n)] + [row(2 * n + 2, moved=True)])
        marks = ", ".join("?" * len(cols))
        db.executemany(f"INSERT INTO {_quote(table)} VALUES ({marks})", rows)


def run(db: sqlite3.Connection, query: str) -> Counter | None:
    """The result multiset, or None if the query fails, runs too long or is not a SELECT
    (a generated ATTACH could write files)."""
    if not re.match(r"\s*(SELECT|WITH)\b", query, re.I):
        return None
    try:
        return Counter(db.execute(query).fetchall())
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return None


def execution_match(prediction: str, rec: dict) -> bool:
    try:
        ddl, tables = schema(rec["input"], rec["output"])
    except (sqlite3.Error, ValueError):
        return False
    names = list(tables) + [c for cols in tables.values() for c in cols]
    gold, pred = to_sqlite(rec["output"], names), to_sqlite(prediction, names)
    db = sandbox()
    try:
        for s in ddl:
            db.execute(s)
        fill(db, tables, gold)
        want, got = run(db, gold), run(db, pred)
    except sqlite3.Error:
        return False
    finally:
        db.close()
    # an empty or failing gold result proves nothing: only a textual match counts then
    if not want:
        return normalize(prediction) == normalize(rec["output"])
    return got == want


def score(prediction: str, rec: dict) -> dict[str, bool]:
    pred = clean(prediction)
    exact = normalize(pred) == normalize(rec["output"])
    return {"exact": exact, "execution": exact or execution_match(pred, rec)}
