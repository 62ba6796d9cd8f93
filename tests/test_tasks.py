"""Task readers: the real files under shared/data, and tiny bad files for every error path."""
import csv
import json
import re

import pytest

from jaxft.tasks import TASKS, DataError, get_task, read_records
from jaxft.tasks import instruct, viggo


# --- real files: counts and first records, checked against a plain read of the same file ---

@pytest.mark.parametrize("split", ["train", "valid"])
def test_viggo_real(data_root, split):
    path = data_root / "viggo" / f"{split}.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    recs, skipped = read_records("viggo", path)
    assert len(recs) + skipped == len(rows) and skipped == 0
    assert recs[0] == {"instruction": viggo.INSTRUCTION, "input": rows[0]["ref"], "output": rows[0]["mr"],
                       "line": 2}
    assert recs[-1]["output"] == rows[-1]["mr"]


def test_viggo_instruction_lists_match_data(data_root):
    recs = [r for s in ("train", "valid") for r in read_records("viggo", data_root / "viggo" / f"{s}.csv")[0]]
    fns = {r["output"].split("(")[0] for r in recs}
    attrs = {a for r in recs for a in re.findall(r"(\w+)\[", r["output"])}
    assert fns == set(viggo.FUNCTIONS) and attrs == set(viggo.ATTRIBUTES)
    assert all(name in viggo.INSTRUCTION for name in fns | attrs)
    assert all(viggo.parse(r["output"]) is not None for r in recs)  # every gold parses


def test_sql_real(data_root):
    path = data_root / "wikisql" / "train.jsonl"
    lines = path.read_text().splitlines()
    recs, skipped = read_records("sql", path)
    assert (len(recs), skipped) == (len(lines), 0)
    text = json.loads(lines[0])["text"]
    assert text.startswith(recs[0]["input"]) and text.endswith(recs[0]["output"])
    assert text[len(recs[0]["input"]):-len(recs[0]["output"])].strip() == "A:"
    assert recs[0]["input"].startswith("table: ") and "\nQ: " in recs[0]["input"]
    assert recs[0]["output"].startswith("SELECT ")


def test_gsm8k_real(data_root):
    path = data_root / "gsm8k" / "train.jsonl"
    first = json.loads(path.read_text().splitlines()[0])
    recs, skipped = read_records("gsm8k", path)
    assert len(recs) == len(path.read_text().splitlines()) and skipped == 0
    assert (recs[0]["input"], recs[0]["output"], recs[0]["line"]) == (first["question"], first["answer"], 1)
    assert all("####" in r["output"] for r in recs)


def test_alpaca_real_and_split(data_root):
    path = data_root / "instruct-ch07" / "instruction-data.json"
    data = json.loads(path.read_text())
    recs, skipped = read_records("alpaca", path)
    assert len(recs) == len(data) and skipped == 0
    assert {k: recs[3][k] for k in ("instruction", "input", "output")} == data[3] and recs[3]["line"] == 3
    n = len(recs)
    train, val, test = instruct.split_alpaca(recs, seed=None)  # ch07: file order
    n_train, n_test = int(n * 0.85), int(n * 0.1)
    assert train == recs[:n_train] and test == recs[n_train:n_train + n_test]
    assert val == recs[n_train + n_test:] and len(val) == n - n_train - n_test
    a, b = instruct.split_alpaca(recs, seed=1), instruct.split_alpaca(recs, seed=1)
    assert a == b and a != instruct.split_alpaca(recs, seed=2)
    assert sorted(r["line"] for part in a for r in part) == list(range(n))  # a partition
    assert [len(p) for p in a] == [len(train), len(val), len(test)]


def test_get_task_and_aliases():
    assert get_task("alpaca") is get_task("instruct")
    for name in ("viggo", "sql", "gsm8k", "alpaca", "jsonl", "csv"):
        mod = get_task(name)
        assert mod.__name__ == f"jaxft.tasks.{TASKS[name]}"
        assert mod.clean("  answer <END_A> more") == "answer"  # every task cuts at the stops
    with pytest.raises(DataError, match="unknown task 'nope'.*gsm8k.*viggo"):
        get_task("nope")


# --- generic readers ---

def test_generic_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"q": "2+2", "a": "4", "sys": "add"}\n\n{"q": "3+3", "a": 6, "sys": "add"}\n')
    recs, skipped = read_records("jsonl", j, {"instruction": "sys", "input": "q", "output": "a"})
    assert skipped == 0
    assert recs == [{"instruction": "add", "input": "2+2", "output": "4", "line": 1},
                    {"instruction": "add", "input": "3+3", "output": "6", "line": 3}]
    c = tmp_path / "d.csv"
    c.write_text('q,a\n"multi\nline",x\nplain,y\n')
    recs, _ = read_records("csv", c, {"input": "q", "output": "a"})
    assert [(r["instruction"], r["input"], r["line"]) for r in recs] == [("", "multi\nline", 2), ("", "plain", 4)]
    with pytest.raises(DataError, match="output"):
        read_records("csv", c, {"input": "q"})


# --- bad input ---

def test_malformed_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_records("gsm8k", p)


def test_malformed_alpaca_json_names_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "input": "", "output": "b"},\n {"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        read_records("alpaca", p)


def test_missing_field_names_field_file_and_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'answer'"):
        read_records("gsm8k", p)
    a = tmp_path / "m.json"
    a.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]))
    with pytest.raises(DataError, match=r"m\.json: item 1: missing field 'output'"):
        read_records("alpaca", a)
    c = tmp_path / "m.csv"
    c.write_text("mr,text\ninform(name[X]),X is a game\n")
    with pytest.raises(DataError, match=r"m\.csv:2: missing field 'ref'"):
        read_records("viggo", c)
    s = tmp_path / "s.jsonl"
    s.write_text(json.dumps({"text": "table: t\ncolumns: a\nQ: why"}) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl:1: field 'text' needs"):
        read_records("sql", s)


def test_malformed_csv_row_names_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('mr,ref\n"inform(name[A])","A"\n"inform(name[B])" oops,"B"\n')
    with pytest.raises(DataError, match=r"bad\.csv:3: malformed CSV row"):
        read_records("viggo", p)
    q = tmp_path / "cols.csv"
    q.write_text('mr,ref\ninform(name[A]),A,extra\n')
    with pytest.raises(DataError, match=r"cols\.csv:2: expected 2 columns"):
        read_records("viggo", q)


def test_non_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes('mr,ref\ninform(name[A]),A\ninform(name[B]),Caf\xe9\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv:3: not UTF-8"):
        read_records("viggo", p)
    j = tmp_path / "latin.jsonl"
    j.write_bytes(b'{"question": "\xff", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:1: not UTF-8"):
        read_records("gsm8k", j)


def test_empty_examples_skipped_and_counted(tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps([
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "  ", "input": "\n", "output": "orphan"},  # no prompt
        {"instruction": "Say", "input": "x", "output": " \t"},  # no response
        {"instruction": "", "input": "only input", "output": "ok"}]))
    recs, skipped = read_records("alpaca", p)
    assert skipped == 2 and [r["line"] for r in recs] == [0, 3]


def test_file_without_records_is_an_error(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text('{"question": " ", "answer": "#### 3"}\n\n')
    with pytest.raises(DataError, match=r"blank\.jsonl: no usable records \(1 empty"):
        read_records("gsm8k", p)
    e = tmp_path / "empty.csv"
    e.write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty CSV"):
        read_records("viggo", e)
    with pytest.raises(DataError, match="file not found"):
        read_records("viggo", tmp_path / "nope.csv")


def test_sql_create_context_records(tmp_path):
    p = tmp_path / "cc.jsonl"
    p.write_text(json.dumps({"question": "How many heads are older than 56?",
                             "context": "CREATE TABLE head (age INTEGER)",
                             "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}) + "\n")
    (rec,), _ = read_records("sql", p)
    assert rec["input"] == "CREATE TABLE head (age INTEGER)\nQ: How many heads are older than 56?"
    assert rec["output"] == "SELECT COUNT(*) FROM head WHERE age > 56"
