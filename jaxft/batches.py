"""Grain batches: encoded examples -> (per virtual shard) shuffle, pack | pad -> batch.

The training split is cut into V virtual shards (data.shards, default one per batch row):
record i belongs to shard i % V. Each shard is its own Grain stream: shuffled with its own
seed (a new order each epoch), encoded by the `map` only when the stream reaches a record
(jaxft/data.py), then packed on its own; row block r of every global batch comes from shard
r. A process serves a contiguous block of shards, so it reads only those records (memory and
startup follow its shard, not the dataset), and the global batches are the same on 1, 2, ...
processes, as long as the count divides V; a checkpoint resumes on any such count. With
data.worker_count > 0 each shard's map runs in Grain worker processes; packing and batching
stay in the trainer's process, so the batches are the same with and without workers.
Validation is small: it is encoded once, in order. One batch is a dict of int32 numpy arrays
of shape [local_batch, L]:

    inputs       ids[:-1]            BOS  a   b   c   d        0 ...
    targets      ids[1:]             a    b   c   d   EOS      0 ...
    loss_mask    mask[1:]            0    0   1   1   1        0 ...   (prompt "a b" masked)
    segment_ids  1..n per example    1    1   1   1   1        0 ...   (0 = padding)
    positions    restart per example 0    1   2   3   4        0 ...

Padding modes: `pack` fills rows of max_length with whole examples (first fit), `max_length`
pads every row to max_length, `longest` pads a batch to its longest row rounded up to a
multiple of LONGEST_MULTIPLE, so the jitted step sees at most max_length/16 shapes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import grain
import jax
import numpy as np
from absl import flags

from jaxft.chat import get_template
from jaxft.config import Config, DataConfig, check_batch_split
from jaxft.data import DataStats, Encoder, check_sample, is_kept, no_examples
from jaxft.errors import ConfigError, DataError

LONGEST_MULTIPLE = 16  # `longest` rows are padded to a multiple of this many tokens
PACKING_BINS = 64  # first-fit bins open at once; more bins fill rows more tightly
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def _shift(ex: dict) -> dict:
    ids, mask = ex["ids"], ex["mask"]
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def _from_packed(row: dict) -> dict:
    return {"inputs": row["inputs"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def _stack_packed(rows: list[dict], n_rows: int, length: int) -> dict:
    out = {k: np.zeros((n_rows, length), np.int32) for k in FIELDS}
    for i, row in enumerate(rows):
        for k in FIELDS:
            out[k][i] = row[k]
    return out


def _pad_rows(rows: list[dict], n_rows: int, length: int | None, cap: int) -> dict:
    """Pads unpacked examples into one batch; length None means `longest` rounding."""
    if length is None:
        longest = max(len(r["inputs"]) for r in rows)
        length = min(cap, math.ceil(longest / LONGEST_MULTIPLE) * LONGEST_MULTIPLE)
    out = {k: np.zeros((n_rows, length), np.int32) for k in FIELDS}
    for i, r in enumerate(rows):
        n = len(r["inputs"])
        out["inputs"][i, :n] = r["inputs"]
        out["targets"][i, :n] = r["targets"]
        out["loss_mask"][i, :n] = r["loss_mask"]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
    return out


def _workers_ready() -> None:
    # Grain's worker processes read absl flags, which a non-absl program never parses.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _rows(encoded: grain.MapDataset, d: DataConfig, *, train: bool, seed: int = 0,
          epochs: int | None = None, workers: int = 0, bins: int = PACKING_BINS) -> grain.IterDataset:
    """One stream of rows from (lazily) encoded examples. train: shuffled with `seed`, `epochs`
    passes (None: forever), a new order each epoch; eval: in order, one pass. `workers`
    processes run the encoding map; the filter and packing after them see the same sequence
    as without workers. Packed rows are full length; other rows are padded by _batch_fn."""
    ds = encoded
    if train:
        ds = ds.shuffle(seed=seed).repeat(epochs)  # repeat reshuffles every epoch
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
        _workers_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it = it.filter(is_kept).map(_shift)
    if d.padding == "pack":
        L = d.max_length
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"inputs": L, "targets": L, "loss_mask": L},
            num_packing_bins=bins, seed=seed, shuffle_bins=train,
            meta_features=("targets", "loss_mask")).map(_from_packed)
    return it


def _batch_fn(d: DataConfig, n_rows: int | None):
    """rows -> one batch of n_rows rows (None: as many as given), padded as d.padding says."""
    L = d.max_length

    def batch(rows):
        n = n_rows or len(rows)
        if d.padding == "pack":
            return _stack_packed(rows, n, L)
        return _pad_rows(rows, n, L if d.padding == "max_length" else None, L)
    return batch


def shard_layout(d: DataConfig, process_index: int, process_count: int) -> tuple[int, range]:
    """(V, the virtual shards this process serves). Record i of the training split belongs to
    shard i % V, and every shard is shuffled and packed on its own; rows r*B/V .. (r+1)*B/V - 1
    of each global batch (B = batch_size) come from shard r, so the global batches are the same on any process count
    that divides V, and a checkpoint resumes on any such count."""
    V = d.shards or d.batch_size
    if d.batch_size % V or V % process_count:
        raise ConfigError(f"data.shards={V} must divide data.batch_size={d.batch_size} and be "
                          f"divisible by the {process_count} processes")
    per = V // process_count
    return V, range(process_index * per, (process_index + 1) * per)


def shard_seed(seed: int, shard: int) -> int:
    """Shard `shard`'s shuffle and packing seed: its own order, whatever the process count."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


class ShardedBatches:
    """This process's training batches: `rows` rows from each of its shards' streams in turn.
    Its state is every shard's Grain iterator state keyed by shard number, so a resume on
    another process count can hand each process the shards it now serves."""

    def __init__(self, streams: dict[int, grain.IterDataset], rows: int, batch_fn):
        self.iters = {v: iter(ds) for v, ds in streams.items()}
        self.rows, self.batch_fn = rows, batch_fn

    def __iter__(self) -> "ShardedBatches":
        return self

    def __next__(self) -> dict:
        # StopIteration from a finished shard (epochs=1) ends the batches
        return self.batch_fn([next(it) for it in self.iters.values() for _ in range(self.rows)])

    def get_state(self) -> dict:
        return {"shards": {str(v): it.get_state() for v, it in self.iters.items()}}

    def set_state(self, state: dict) -> None:
        shards = state.get("shards", {}) if isinstance(state, dict) else {}
        missing = [v for v in self.iters if str(v) not in shards]
        if missing:
            raise DataError(f"the data state has no position for virtual shards {missing} (it "
                            f"holds {sorted(shards, key=int)}): was data.shards or data.batch_size "
                            "changed since the checkpoint?")
        for v, it in self.iters.items():
            it.set_state(shards[str(v)])


class Loader:
    """Batches for one process. A train loader is one endless iterator: iterating it again
    continues where it stopped, and get_state()/set_state() save and restore that point (the
    trainer keeps that state, as JSON, in every checkpoint). An eval loader makes a
    fresh in-order pass each time it is iterated, `num_batches` long on every process."""

    def __init__(self, make_dataset, stats_fn, *, train: bool, num_batches: int | None,
                 empty_batch: dict | None, counts: DataStats | None = None):
        self.counts = counts  # training: the counts of the first records of this shard (cheap)
        self._make_dataset = make_dataset
        self._stats_fn = stats_fn
        self._stats: DataStats | None = None
        self.train = train
        self.num_batches = num_batches
        self._empty_batch = empty_batch
        self._iterator = None

    @property
    def iterator(self) -> grain.DatasetIterator:
        if self._iterator is None:
            self._iterator = iter(self._make_dataset())
        return self._iterator

    def __iter__(self) -> Iterator[dict]:
        if self.train:
            return self.iterator
        return self._eval_pass()

    def _eval_pass(self) -> Iterator[dict]:
        n = 0
        for batch in self._make_dataset():
            n += 1
            yield batch
        # Processes whose shard ran out early feed fully masked batches, so every process
        # steps the same number of times.
        for _ in range(n, self.num_batches):
            yield {k: v.copy() for k, v in self._empty_batch.items()}

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)

    @property
    def stats(self) -> DataStats:
        """Counts of the encoded data; the padding ratio is measured on first access."""
        if self._stats is None:
            self._stats = self._stats_fn()
        return self._stats


def padding_ratio(batches) -> float:
    """Share of row slots holding padding, over rows that carry at least one token."""
    slots = real = 0
    for b in batches:
        seg = b["segment_ids"]
        rows = (seg > 0).any(axis=1)
        slots += int(rows.sum()) * seg.shape[1]
        real += int((seg > 0).sum())
    return 1.0 - real / slots if slots else 0.0


def _train_loader(encoder: Encoder, n: int, d: DataConfig, local_batch: int, p: int, P: int,
                  skipped_empty: int) -> Loader:
    """Process p's endless training loader: its virtual shards (shard_layout), each reading
    records v, v + V, ... of the split."""
    V, mine = shard_layout(d, p, P)
    rows = d.batch_size // V
    sample = check_sample(encoder, (i for i in range(n) if i % V in mine), d)

    def dataset(epochs=None, workers=d.worker_count):
        streams = {v: _rows(grain.MapDataset.range(v, n, V).map(encoder), d, train=True,
                            seed=shard_seed(d.seed, v), epochs=epochs, workers=workers,
                            bins=max(PACKING_BINS, rows)) for v in mine}
        return ShardedBatches(streams, rows, _batch_fn(d, local_batch))

    def stats_fn():
        # One in-order pass over every record, counts summed; the padding ratio is measured
        # on this process's batches until its first shard ends an epoch.
        stats = DataStats(skipped_empty=skipped_empty)
        for i in range(n):
            stats.count(encoder(i))
        return dataclasses.replace(stats, padding_ratio=padding_ratio(dataset(1, workers=0)))
    return Loader(dataset, stats_fn, train=True, num_batches=None, empty_batch=None,
                  counts=sample)


def _eval_loader(encoder: Encoder, n: int, d: DataConfig, local_batch: int, p: int, P: int,
                 skipped_empty: int) -> Loader:
    """Process p's in-order validation loader. Validation is small, so it is encoded once,
    whole, and the kept examples are sharded: every process can count every shard's batches."""
    stats, kept = DataStats(skipped_empty=skipped_empty), []
    for i in range(n):
        ex = encoder(i)
        stats.count(ex)
        if is_kept(ex):
            kept.append(ex)
    if not kept:
        raise no_examples(n, stats, d)
    if len(kept) < P:
        raise DataError(f"{len(kept)} validation examples cannot feed {P} processes")

    def dataset(q=p, full_rows=True):
        rows = _rows(grain.MapDataset.source(kept)[q::P], d, train=False,
                     bins=max(PACKING_BINS, local_batch))
        return rows.batch(local_batch, batch_fn=_batch_fn(d, local_batch if full_rows else None))

    def stats_fn():
        return dataclasses.replace(stats, padding_ratio=padding_ratio(dataset(full_rows=False)))

    # Every process must run the same number of eval steps; packing makes the count depend on
    # the lengths, so count each shard's batches.
    if d.padding == "pack":
        counts = [sum(1 for _ in dataset(q)) for q in range(P)]
    else:
        counts = [math.ceil(len(range(q, len(kept), P)) / local_batch) for q in range(P)]
    width = LONGEST_MULTIPLE if d.padding == "longest" else d.max_length
    empty = {k: np.zeros((local_batch, min(width, d.max_length)), np.int32) for k in FIELDS}
    return Loader(dataset, stats_fn, train=False, num_batches=max(counts), empty_batch=empty)


def make_loader(cfg: Config, tokenizer, records, *, train: bool,
                process_index: int | None = None, process_count: int | None = None,
                skipped_empty: int = 0) -> Loader:
    """This process's Loader over `records`: a Split (lazy) or any list of records.

    process_index/process_count default to jax.process_index()/process_count(). Training: a
    process reads and encodes only the records of its virtual shards (shard_layout);
    validation is encoded whole and its kept examples split every process_count-th.
    `skipped_empty` adds records a reader skipped before `records` to the counts.
    """
    d = cfg.data
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    check_batch_split(d.batch_size, processes=process_count)
    local_batch = d.batch_size // process_count
    template = get_template(d.template, d.include_instruction, tokenizer)
    if len(records) < process_count:
        raise DataError(f"{len(records)} records cannot feed {process_count} processes")
    encoder = Encoder(records, tokenizer, template, d)
    make = _train_loader if train else _eval_loader
    return make(encoder, len(records), d, local_batch, process_index, process_count,
                skipped_empty)
