"""The lazy, sharded pipeline: record sources and the JSONL index, the same batches and counts
as the eager pipeline it replaced (tests/eager_pipeline.py) on the shipped recipes, each
process reading only its shard, workers equal to no workers, exact resume, bad lines found
deep in a file, and the bounded "no examples left" check."""
import dataclasses
import json
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from eager_pipeline import eager_load_split, make_eager_loader
from jaxft import source as source_lib
from jaxft.config import load_config
from jaxft.batches import FIELDS, make_loader, shard_layout
from jaxft.data import SAMPLE, Split, build_tokenizer, open_split
from jaxft.source import JsonlRows, RecordSource, build_index, load_index
from jaxft.tasks import DataError, iter_jsonl, read_records
from test_data import segments, take

ONE = {"process_index": 0, "process_count": 1}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "index"


@pytest.fixture(scope="module")
def tok_dir(sp_tokenizer, tmp_path_factory):
    return sp_tokenizer.save(tmp_path_factory.mktemp("lazy") / "tok")


def recipe(name, data_root, tok_dir, *sets):
    return load_config(CONFIGS / f"{name}.yaml", [f"data.root={data_root}",
                                                f"data.tokenizer={tok_dir}",
                                                "data.train_tokenizer_vocab=0", *sets])


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


def write_jsonl(path, rows, blank_every=0):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- sources -----------------------------------------------------------------------------

def test_jsonl_index_matches_the_eager_reader(tmp_path, index_cache):
    path = tmp_path / "a.jsonl"
    rows = [{"question": f"q{i} " + "x" * (i % 90), "answer": f"a{i}"} for i in range(50)]
    text = "\ufeff" + "\r\n".join(json.dumps(r) for r in rows[:10]) + "\r\n\n\t\n"
    text += "\n".join(json.dumps(r) for r in rows[10:])  # no final newline
    path.write_text(text, encoding="utf-8")
    lazy = JsonlRows(path)
    assert [lazy[i] for i in range(len(lazy))] == list(iter_jsonl(path))
    assert len(list(index_cache.iterdir())) == 1  # cached ...
    before = load_index(str(path))
    assert isinstance(before, np.memmap)  # ... and mapped, not read, the second time
    time.sleep(0.01)
    path.write_text(text + "\n" + json.dumps({"question": "new", "answer": "b"}) + "\n")
    assert len(JsonlRows(path)) == 51  # a changed file gets a new index
    assert len(build_index(str(tmp_path / "a.jsonl"))) == 51


@pytest.mark.parametrize("task,rel", [("viggo", "viggo/valid.csv"), ("sql", "wikisql/valid.jsonl"),
                                      ("alpaca", "instruct-ch07/instruction-data.json")])
def test_record_source_equals_read_records(data_root, task, rel):
    src = RecordSource(task, data_root / rel)
    want, skipped = read_records(task, data_root / rel)
    got = [src[i] for i in range(len(src))]
    assert [r for r in got if r is not None] == want
    assert sum(r is None for r in got) == skipped
    clone = pickle.loads(pickle.dumps(src))  # what a Grain worker receives
    assert clone[len(src) - 1] == got[-1]


def test_chat_sources_lazy_and_listed(tmp_path):
    msgs = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]
            for i in range(5)]
    rows = [{"messages": m} for m in msgs] + [{"messages": [{"role": "user", "content": "x"}]}]
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows, blank_every=2)
    listed = tmp_path / "c.json"
    listed.write_text(json.dumps(rows))
    for path in (jsonl, listed):
        src = RecordSource("chat", path)
        want, skipped = read_records("chat", path)
        got = [src[i] for i in range(len(src))]
        assert [r for r in got if r] == want and skipped == 1 and got[-1] is None


def test_malformed_line_deep_in_a_file_names_file_and_line(tmp_path, data_root, tok_dir):
    rows = [{"question": f"What is {i} plus one?", "answer": f"#### {i + 1}"} for i in range(3000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    lines = path.read_text().splitlines()
    lines[2700] = '{"question": "broken", "answer": '
    path.write_text("\n".join(lines) + "\n")
    src = RecordSource("gsm8k", path)  # the index pass does not parse: it succeeds
    assert len(src) == 3000 and src[2699]["line"] == 2700
    with pytest.raises(DataError, match=r"big\.jsonl:2701: malformed JSON .*reached this record"):
        src[2700]
    cfg = recipe("gsm8k", data_root, tok_dir, f"data.train_file={path}", "data.valid_file=x",
                 "data.max_length=64", "data.batch_size=4", "data.worker_count=2",
                 "data.shards=1")
    loader = make_loader(cfg, build_tokenizer(cfg), open_split(cfg, "train"), train=True, **ONE)
    with pytest.raises(DataError, match=r"big\.jsonl:2701: malformed JSON"):
        take(iter(loader), 3000)  # raised in a worker, named in the trainer's process


# --- the pipeline against the eager one ---------------------------------------------------

RECIPES = [  # (config, overrides): every shipped task reader and padding mode, tiny slices
    ("tiny-viggo", ["data.limit=48"]),
    ("viggo", ["data.limit=40", "data.padding=longest", "data.max_length=320"]),
    ("sql", ["data.limit=40", "data.max_length=192", "data.batch_size=4"]),
    ("gsm8k", ["data.limit=16", "data.batch_size=4"]),
    ("instruct", ["data.limit=20", "data.padding=max_length"]),
]


@pytest.mark.parametrize("name,sets", RECIPES, ids=[r[0] for r in RECIPES])
def test_lazy_equals_eager_on_the_recipes(data_root, tok_dir, name, sets):
    cfg = recipe(name, data_root, tok_dir, *sets)
    tok = build_tokenizer(cfg)
    lazy = open_split(cfg, "train")
    records, skipped = eager_load_split(cfg, "train")
    assert [lazy[i] for i in range(len(lazy))] == records and skipped == 0
    new = make_loader(cfg, tok, lazy, train=True, **ONE)
    old = make_eager_loader(cfg, tok, records, train=True, **ONE)
    n = 2 * -(-len(records) // cfg.data.batch_size) + 1  # into the third epoch
    same_batches(take(iter(new), n), take(iter(old), n))
    assert new.stats == old.stats and new.stats.dropped == 0  # drops: see the next test
    valid = open_split(cfg, "valid")
    want = eager_load_split(cfg, "valid")[0][:24]
    small = Split(valid.source, valid.indices[:24])  # validation: same, in order
    assert [small[i] for i in range(24)] == want
    same_batches(list(make_loader(cfg, tok, small, train=False, **ONE)),
                 list(make_eager_loader(cfg, tok, want, train=False, **ONE)))


def test_dropped_examples_keep_their_place(data_root, tok_dir):
    """With overlong=drop, the shards' shuffles run over every record and skip the dropped ones
    where they fall, lazily and eagerly alike: the same batches and counts."""
    cfg = recipe("tiny-viggo", data_root, tok_dir, "data.limit=60", "data.max_length=150",
                 "data.overlong=drop", "data.padding=longest", "data.batch_size=2")
    tok = build_tokenizer(cfg)
    records, _ = eager_load_split(cfg, "train")
    new = make_loader(cfg, tok, open_split(cfg, "train"), train=True, **ONE)
    old = make_eager_loader(cfg, tok, records, train=True, **ONE)
    kept = old.stats.examples
    assert 0 < kept < 60 and new.stats == old.stats
    same_batches(take(iter(new), kept), take(iter(old), kept))


def test_each_process_reads_only_its_shard(data_root, tok_dir):
    """Two processes: every record either reads is in its own shard, and one epoch reads all
    of it; the shards cover the split without overlap."""
    cfg = recipe("tiny-viggo", data_root, tok_dir, "data.limit=50", "data.batch_size=4")
    tok = build_tokenizer(cfg)
    split = open_split(cfg, "train")

    class Logged:
        def __init__(self):
            self.read = []

        def __len__(self):
            return len(split)

        def __getitem__(self, i):
            self.read.append(i)
            return split[i]
    reads = []
    for p in (0, 1):
        src = Logged()
        loader = make_loader(cfg, tok, src, train=True, process_index=p, process_count=2)
        # the bounded check reads the first records of its own shard only (its counts are
        # the trainer's first data line)
        own = [i for i in range(50) if (i % 4) // 2 == p]  # shards 2p, 2p + 1 of 4
        assert src.read == own[:SAMPLE]
        take(iter(loader), 8)  # 8 x 2 rows of packed viggo: more than the shard's 25
        assert set(src.read) == set(own)
        reads.append(Counter(src.read))
    assert not set(reads[0]) & set(reads[1])
    counts = reads[0].values()  # once an epoch, + 1 for the checked ones and a partial epoch
    assert max(counts) - min(counts) <= 2


def test_workers_give_the_same_batches_and_resume(data_root, tok_dir):
    # Two virtual shards, each with its own two workers (4 processes, not the 16 of one shard
    # per row): the shards-with-workers path at a quarter of the start-up cost.
    cfg = recipe("tiny-viggo", data_root, tok_dir, "data.limit=40", "data.max_length=96",
                 "data.shards=2")
    tok = build_tokenizer(cfg)
    split = open_split(cfg, "train")
    plain = take(iter(make_loader(cfg, tok, split, train=True, **ONE)), 14)
    wcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, worker_count=2))
    workers = make_loader(wcfg, tok, split, train=True, **ONE)
    same_batches(take(iter(workers), 6), plain[:6])
    state = json.loads(json.dumps(workers.get_state()))
    fresh = make_loader(wcfg, tok, split, train=True, **ONE)
    fresh.set_state(state)
    same_batches(take(iter(fresh), 8), plain[6:])


def test_no_examples_left_fails_on_a_bounded_sample(tmp_path, data_root, tok_dir):
    rows = [{"question": "Q " * 200, "answer": "A"} for _ in range(5000)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cfg = recipe("gsm8k", data_root, tok_dir, f"data.train_file={path}", "data.valid_file=x",
                 "data.max_length=32", "data.overlong=drop")
    tok = build_tokenizer(cfg)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=f"no examples left after filtering the first {SAMPLE} "
                                        r"records of this process's shard .* 256 dropped"):
        make_loader(cfg, tok, open_split(cfg, "train"), train=True, **ONE)
    assert time.perf_counter() - t0 < 30  # 256 of 5000 records, not all of them


def test_holdout_split_is_by_index_and_reads_nothing(tmp_path, data_root, tok_dir, monkeypatch):
    cfg = recipe("gsm8k", data_root, tok_dir)
    monkeypatch.setattr(source_lib.JsonlRows, "__getitem__", lambda self, i: 1 / 0)
    train, valid = open_split(cfg, "train"), open_split(cfg, "valid")  # no record is read
    n = len(train.source)
    assert len(valid) == int(n * 0.05) and len(train) + len(valid) == n
    assert not set(train.indices) & set(valid.indices)
    assert np.array_equal(open_split(cfg, "train").indices, train.indices)


def test_virtual_shards_same_global_batch_on_any_process_count(data_root, tok_dir):
    """The rows of a global batch do not depend on how many processes serve them: 4 processes'
    local batches, stacked, are the one process's batches, step after step; a state saved by
    one process restores shard by shard in another layout, and bad layouts are clear errors."""
    from jaxft.errors import ConfigError
    cfg = recipe("tiny-viggo", data_root, tok_dir, "data.limit=120", "data.max_length=96")
    tok = build_tokenizer(cfg)
    split = open_split(cfg, "train")
    one = make_loader(cfg, tok, split, train=True, **ONE)
    four = [make_loader(cfg, tok, split, train=True, process_index=p, process_count=4)
            for p in range(4)]
    whole = take(iter(one), 5)
    parts = [take(iter(x), 5) for x in four]
    stacked = [{k: np.concatenate([p[i][k] for p in parts]) for k in FIELDS} for i in range(5)]
    same_batches(stacked, whole)
    state = one.get_state()
    fresh = [make_loader(cfg, tok, split, train=True, process_index=p, process_count=2)
             for p in range(2)]
    for x in fresh:
        x.set_state(state)  # the trainer merges the per-process states into this one dict
    after = [take(iter(x), 3) for x in fresh]
    same_batches([{k: np.concatenate([a[i][k] for a in after]) for k in FIELDS} for i in range(3)],
                 take(iter(one), 3))
    with pytest.raises(DataError, match=r"no position for virtual shards \[0, 1, 2, 3\]"):
        fresh[0].set_state({"shards": {"4": None}})
    with pytest.raises(ConfigError, match="data.shards=8 must divide .* divisible by the 3 processes"):
        shard_layout(cfg.data, 0, 3)
    with pytest.raises(ConfigError, match="data.shards=3 must divide data.batch_size=8"):
        recipe("tiny-viggo", data_root, tok_dir, "data.shards=3")
