"""The Grain pipeline on slices of the real ViGGO file with a real SentencePiece tokenizer."""
import dataclasses
import json
from collections import Counter

import numpy as np
import pytest

from jaxft.config import Config, ConfigError, DataConfig, load_config
from jaxft.batches import FIELDS, LONGEST_MULTIPLE, make_loader
from jaxft.data import build_tokenizer, encode_records, load_split
from jaxft.tasks import DataError, read_records
from jaxft.templates import get_template, tokenize_example
from jaxft.tokenizer import load_tokenizer

N = 37  # records in most tests: odd, so shards and the last batch come out uneven


@pytest.fixture(scope="module")
def records(data_root):
    recs, _ = read_records("viggo", data_root / "viggo" / "train.csv")
    return recs[:200]


@pytest.fixture(scope="module")
def template():
    return get_template("special-tokens", include_instruction=False)


@pytest.fixture(scope="module")
def tok(sp_tokenizer, template, tmp_path_factory):
    # A private copy: adding tokens to the shared session fixture would leak into other tests.
    tok = load_tokenizer(sp_tokenizer.save(tmp_path_factory.mktemp("tok") / "t"))
    tok.add_special_tokens(list(template.special_tokens))
    return tok


def cfg_for(data_root, **data) -> Config:
    base = DataConfig(root=str(data_root), template="special-tokens", max_length=320,
                      batch_size=4, padding="longest")
    return Config(data=dataclasses.replace(base, **data))


def take(it, n):
    return [next(it) for _ in range(n)]


def segments(batches):
    """Every (inputs, targets, loss_mask) segment in the batches, in order."""
    out = []
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                sel = seg == s
                out.append(tuple(b[k][r][sel] for k in ("inputs", "targets", "loss_mask")))
    return out


def encoded(tok, template, recs, **over):
    d = dataclasses.replace(DataConfig(), **over)
    return [tokenize_example(tok, template, r, train_on=d.train_on) for r in recs]


def key(arr):
    return tuple(int(x) for x in arr)


@pytest.mark.parametrize("train_on", ["response", "all"])
def test_shift_by_one_and_masks(data_root, records, tok, template, train_on):
    cfg = cfg_for(data_root, train_on=train_on, batch_size=8)
    recs = records[:N]
    batches = list(make_loader(cfg, tok, recs, train=False, process_index=0, process_count=1))
    rows = [(b, r) for b in batches for r in range(8)][:N]
    for (b, r), rec in zip(rows, recs):
        n = len(tokenize_example(tok, template, rec, train_on=train_on)["ids"]) - 1
        ids = [tok.bos_id] + tok.encode(template.prompt(rec)) + tok.encode(template.response(rec))
        ids.append(tok.eos_id)
        assert n == len(ids) - 1
        np.testing.assert_array_equal(b["inputs"][r, :n], ids[:-1])
        np.testing.assert_array_equal(b["targets"][r, :n], ids[1:])
        n_prompt = 1 + len(tok.encode(template.prompt(rec)))
        want_mask = np.ones(n, np.int32)
        if train_on == "response":
            want_mask[:n_prompt - 1] = 0  # targets before the first response token
        np.testing.assert_array_equal(b["loss_mask"][r, :n], want_mask)
        # The last response token predicts EOS, and that prediction is trained.
        assert b["targets"][r, n - 1] == tok.eos_id and b["loss_mask"][r, n - 1] == 1
        np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))
        for k in FIELDS:  # padding is zero everywhere, so it never counts in the loss
            assert not b[k][r, n:].any(), k
    # The last batch holds N % 8 examples; the rest are fully masked filler rows.
    assert len(batches) == -(-N // 8)
    assert not batches[-1]["loss_mask"][N % 8:].any()
    assert not batches[-1]["segment_ids"][N % 8:].any()


def test_longest_and_max_length_shapes(data_root, records, tok):
    recs = records[:N]
    longest = make_loader(cfg_for(data_root), tok, recs, train=False, process_index=0,
                          process_count=1)
    for b in longest:
        real = int((b["segment_ids"] > 0).sum(axis=1).max())
        L = b["inputs"].shape[1]
        assert L % LONGEST_MULTIPLE == 0 and real <= L < real + LONGEST_MULTIPLE
    fixed = make_loader(cfg_for(data_root, padding="max_length", max_length=100), tok, recs,
                        train=False, process_index=0, process_count=1)
    b = next(iter(fixed))
    assert all(b[k].shape == (4, 100) and b[k].dtype == np.int32 for k in FIELDS)


def test_pack_rows_hold_whole_examples(data_root, records, tok, template):
    cfg = cfg_for(data_root, padding="pack")
    loader = make_loader(cfg, tok, records, train=False, process_index=0, process_count=1)
    batches = list(loader)
    for b in batches:
        assert b["inputs"].shape == (4, 320)
        for seg, pos in zip(b["segment_ids"], b["positions"]):
            n = int((seg > 0).sum())
            assert not seg[n:].any()  # padding only at the end of a row
            assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1)
            if n:
                assert seg[0] == 1  # ids run 1..k
            for s in np.unique(seg[:n]):
                np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    # Every example appears exactly once, whole: its segment is its full shifted sequence.
    got = Counter((key(i), key(t), key(m)) for i, t, m in segments(batches))
    want = Counter()
    for e in encoded(tok, template, records):
        ids, mask = np.asarray(e["ids"]), np.asarray(e["mask"])
        want[(key(ids[:-1]), key(ids[1:]), key(mask[1:]))] += 1
    assert got == want
    assert sum(len(s[0]) for s in segments(batches)) == loader.stats.tokens


def test_padding_ratio_by_mode(data_root, records, tok):
    ratios = {}
    for mode in ("max_length", "longest", "pack"):
        loader = make_loader(cfg_for(data_root, padding=mode), tok, records, train=False,
                             process_index=0, process_count=1)
        ratios[mode] = loader.stats.padding_ratio
        if mode == "max_length":
            s = loader.stats
            assert ratios[mode] == pytest.approx(1 - s.tokens / (s.examples * 320))
    assert ratios["pack"] < ratios["longest"] < ratios["max_length"]


@pytest.mark.parametrize("padding", ["pack", "longest"])
def test_deterministic_for_a_seed(data_root, records, tok, padding):
    def first(seed):
        cfg = cfg_for(data_root, padding=padding, seed=seed)
        it = iter(make_loader(cfg, tok, records[:N], train=True, process_index=0,
                              process_count=1))
        return take(it, 12)  # 12 x 4 rows > 37 examples: crosses an epoch
    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_epochs_are_reshuffled(data_root, records, tok):
    cfg = cfg_for(data_root, padding="longest", batch_size=1)
    it = iter(make_loader(cfg, tok, records[:N], train=True, process_index=0, process_count=1))
    epochs = [[key(b["inputs"][0][b["segment_ids"][0] > 0]) for b in take(it, N)]
              for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


@pytest.mark.parametrize("padding", ["pack", "longest"])
def test_state_restore_continues_exactly(data_root, records, tok, padding):
    cfg = cfg_for(data_root, padding=padding, max_length=96)
    loader = make_loader(cfg, tok, records[:N], train=True, process_index=0, process_count=1)
    take(iter(loader), 5)
    state = json.loads(json.dumps(loader.get_state()))  # survives a JSON round trip
    want = take(iter(loader), 8)  # on through the epoch boundary
    fresh = make_loader(cfg, tok, records[:N], train=True, process_index=0, process_count=1)
    fresh.set_state(state)
    got = take(iter(fresh), 8)
    for x, y in zip(want, got):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("padding", ["pack", "max_length"])
def test_process_shards_are_disjoint_and_cover(data_root, records, tok, template, padding):
    cfg = cfg_for(data_root, padding=padding, batch_size=4)
    seen, lengths = [], []
    for p in (0, 1):
        loader = make_loader(cfg, tok, records[:N], train=False, process_index=p,
                             process_count=2)
        batches = list(loader)
        assert all(b["inputs"].shape[0] == 2 for b in batches)  # local batch = 4 // 2
        lengths.append(len(batches))
        seen.append(Counter(key(s[0]) for s in segments(batches)))
    assert lengths[0] == lengths[1]  # every process steps the same number of times
    assert not set(seen[0]) & set(seen[1])
    want = Counter(key(e["ids"][:-1]) for e in encoded(tok, template, records[:N]))
    assert seen[0] + seen[1] == want
    # Train: 4 virtual shards (one per row), record i in shard i % 4; process p serves
    # shards 2p and 2p + 1 and draws only from their records.
    everything = encoded(tok, template, records[:N])
    assert len(everything) == N  # nothing dropped, so example i is record i
    for p in (0, 1):
        it = iter(make_loader(cfg, tok, records[:N], train=True, process_index=p,
                              process_count=2))
        own = {key(e["ids"][:-1]) for i, e in enumerate(everything) if (i % 4) // 2 == p}
        assert {key(s[0]) for s in segments(take(it, 4))} <= own


def test_truncate_and_drop_counts(data_root, records, tok, template):
    L = 120
    full = encoded(tok, template, records)
    over = [e for e in full if len(e["ids"]) > L + 1]
    no_target = [e for e in over if not np.asarray(e["mask"])[1:L + 1].any()]
    assert no_target and len(over) < len(records)  # the slice exercises every branch
    truncated = make_loader(cfg_for(data_root, max_length=L, overlong="truncate"), tok, records,
                            train=False, process_index=0, process_count=1)
    s = truncated.stats
    assert (s.truncated, s.dropped, s.no_target) == (len(over), len(no_target), len(no_target))
    assert s.examples == len(records) - len(no_target)
    assert all(b["inputs"].shape[1] <= L for b in truncated)
    dropped = make_loader(cfg_for(data_root, max_length=L, overlong="drop"), tok, records,
                          train=False, process_index=0, process_count=1)
    s = dropped.stats
    assert (s.truncated, s.dropped, s.examples) == (0, len(over), len(records) - len(over))
    assert s.tokens == sum(len(e["ids"]) - 1 for e in full if len(e["ids"]) <= L + 1)
    assert s.target_tokens == sum(int(np.sum(e["mask"][1:])) for e in full
                                  if len(e["ids"]) <= L + 1)


def test_empty_after_filtering_is_an_error(data_root, records, tok, template):
    d = DataConfig(max_length=4, train_on="response")  # every prompt outgrows 5 ids
    with pytest.raises(DataError, match="no examples left"):
        encode_records(tok, template, records[:10], d)
    with pytest.raises(DataError, match="no examples left"):
        make_loader(cfg_for(data_root, max_length=4, overlong="drop"), tok, records[:10],
                    train=True, process_index=0, process_count=1)


def test_load_split(data_root):
    cfg = cfg_for(data_root, limit=50)
    train, _ = load_split(cfg, "train")
    valid, _ = load_split(cfg, "valid")
    assert len(train) == 50 and len(valid) > 50  # the limit trims training records only
    held = cfg_for(data_root, valid_file="")
    t1, _ = load_split(held, "train")
    v1, _ = load_split(held, "valid")
    t2, _ = load_split(held, "train")
    lines = lambda rs: {r["line"] for r in rs}  # noqa: E731
    assert not lines(t1) & lines(v1) and lines(t1) == lines(t2)
    full, _ = load_split(cfg_for(data_root), "train")
    assert lines(t1) | lines(v1) == lines(full)
    assert lines(load_split(held, "test")[0]) == lines(v1)  # one held-out set: test is valid
    with pytest.raises(ValueError, match="train, valid, test"):
        load_split(cfg, "eval")


def test_ch07_split_is_85_5_10_and_disjoint(data_root):
    """The instruct task's test split (what ch07 scores) is its own 10 %, apart from both."""
    cfg = load_config(None, ["data.task=instruct", "data.train_file=instruct-ch07/instruction-data.json",
                             "data.valid_file=", f"data.root={data_root}"])
    parts = {s: {r["line"] for r in load_split(cfg, s)[0]} for s in ("train", "valid", "test")}
    n = sum(map(len, parts.values()))
    assert len(parts["test"]) == int(n * 0.1) and len(parts["train"]) == int(n * 0.85)
    assert not (parts["train"] & parts["test"] or parts["valid"] & parts["test"]
                or parts["train"] & parts["valid"])


def test_build_tokenizer(data_root, records, template, tmp_path, tok):
    cfg = cfg_for(data_root, train_tokenizer_vocab=500)
    trained = build_tokenizer(cfg, records)
    assert len(trained) >= 500
    for t in template.special_tokens:  # each special token is one id of its own
        assert len(trained.encode(t)) == 1
    saved = tok.save(tmp_path / "given")
    loaded = build_tokenizer(cfg_for(data_root, tokenizer=str(saved)))
    assert loaded.encode("Dirt: Showdown <START_A>") == tok.encode("Dirt: Showdown <START_A>")
    with pytest.raises(ConfigError, match="tokenizer"):
        build_tokenizer(cfg_for(data_root))
