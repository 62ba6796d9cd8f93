"""The eager pipeline the lazy one replaced, kept for comparison: it reads every record and
tokenises all of them up front, then shards the in-memory list. Its training batches use the
virtual-shard layout of jaxft/data.py over the pre-encoded records, so tests can check that
the lazy pipeline reads and encodes exactly what the eager one holds; bench/data_scale.py
times both."""
from __future__ import annotations

import dataclasses
import math
import random

import grain
import jax
import numpy as np

from jaxft import tasks
from jaxft.config import Config, DataConfig, check_batch_split, data_path
from jaxft.chat import get_template
from jaxft.batches import (FIELDS, LONGEST_MULTIPLE, PACKING_BINS, Loader, ShardedBatches,
                           _batch_fn, _from_packed, _pad_rows, _rows, _shift, _stack_packed,
                           padding_ratio, shard_layout, shard_seed)
from jaxft.data import HOLDOUT_FRACTION, DataStats, encode_one
from jaxft.errors import DataError
from jaxft.tasks.instruct import split_alpaca
from jaxft.templates import tokenize_example


def encode_records(tok, template, records: list[dict], d: DataConfig,
                   skipped_empty: int = 0) -> tuple[list[dict], DataStats]:
    """Tokenises records into {"ids", "mask"} int32 arrays, applying d.overlong and dropping
    examples left without a target token. Raises DataError when nothing is left."""
    stats = DataStats(skipped_empty=skipped_empty)
    keep = d.max_length + 1  # inputs and targets are both max_length after the shift
    out = []
    for rec in records:
        ex = tokenize_example(tok, template, rec, train_on=d.train_on)
        if len(ex["ids"]) > keep and d.overlong == "truncate" and hasattr(template, "fit"):
            # Conversations lose whole turns from the end; one whose first reply is already
            # too long is dropped (both counted as truncated / dropped).
            ex = template.fit(tok, rec, d.train_on, keep)
            if ex is None:
                stats.dropped += 1
                continue
            stats.truncated += 1
        ids = np.asarray(ex["ids"], np.int32)
        mask = np.asarray(ex["mask"], np.int32)
        if len(ids) > keep:
            if d.overlong == "drop":
                stats.dropped += 1
                continue
            ids, mask = ids[:keep], mask[:keep]
            stats.truncated += 1
        n_target = int(mask[1:].sum())
        if n_target == 0:
            stats.dropped += 1
            stats.no_target += 1
            continue
        stats.examples += 1
        stats.tokens += len(ids) - 1
        stats.target_tokens += n_target
        out.append({"ids": ids, "mask": mask})
    if not out:
        raise DataError(
            f"no examples left after filtering {len(records)} records (max_length="
            f"{d.max_length}, overlong={d.overlong}): {stats.truncated} truncated, "
            f"{stats.dropped} dropped, {stats.no_target} of them without a target token")
    return out, stats


def _shard(examples: list[dict], process_index: int, process_count: int) -> grain.MapDataset:
    return grain.MapDataset.source(examples)[process_index::process_count]


def _dataset(examples: list[dict], d: DataConfig, local_batch: int, *, train: bool,
             process_index: int, process_count: int, epochs: int | None = None,
             full_rows: bool = True) -> grain.IterDataset:
    """The Grain pipeline for this process. train: shuffled, `epochs` passes (None: forever),
    partial batches dropped; eval: in order, one pass, the last batch padded with empty rows
    when `full_rows`."""
    ds = _shard(examples, process_index, process_count)
    if train:
        ds = ds.shuffle(seed=d.seed).repeat(epochs)  # repeat reshuffles every epoch
    # The map is a cheap slice; threads would cost more than they save.
    it = ds.map(_shift).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    L = d.max_length
    if d.padding == "pack":
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"inputs": L, "targets": L, "loss_mask": L},
            num_packing_bins=max(PACKING_BINS, local_batch), seed=d.seed, shuffle_bins=train,
            meta_features=("targets", "loss_mask")).map(_from_packed)

    def batch_fn(rows):
        n_rows = local_batch if full_rows else len(rows)
        if d.padding == "pack":
            return _stack_packed(rows, n_rows, L)
        return _pad_rows(rows, n_rows, L if d.padding == "max_length" else None, L)

    it = it.batch(local_batch, drop_remainder=train and epochs is None, batch_fn=batch_fn)
    if d.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.worker_count))
    return it


def make_eager_loader(cfg: Config, tokenizer, records: list[dict], *, train: bool,
                process_index: int | None = None, process_count: int | None = None,
                skipped_empty: int = 0) -> Loader:
    """Encodes `records` with cfg.data's template and returns this process's Loader.

    process_index/process_count default to jax.process_index()/process_count(); each
    process reads only every process_count-th example, starting at its index.
    """
    d = cfg.data
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    check_batch_split(d.batch_size, processes=process_count)
    local_batch = d.batch_size // process_count
    template = get_template(d.template, d.include_instruction, tokenizer)
    examples, stats = encode_records(tokenizer, template, records, d, skipped_empty)
    if len(examples) < process_count:
        raise DataError(f"{len(examples)} examples cannot feed {process_count} processes")

    if train:  # every record encoded now; the virtual shards hold the encoded examples
        every = [encode_one(tokenizer, template, r, d) for r in records]
        V, mine = shard_layout(d, process_index, process_count)
        rows = d.batch_size // V

        def dataset(epochs=None):
            streams = {v: _rows(grain.MapDataset.source(every)[v::V], d, train=True,
                                seed=shard_seed(d.seed, v), epochs=epochs,
                                workers=d.worker_count if epochs is None else 0,
                                bins=max(PACKING_BINS, rows)) for v in mine}
            return ShardedBatches(streams, rows, _batch_fn(d, local_batch))
    else:
        def dataset(p=process_index, **kw):
            return _dataset(examples, d, local_batch, train=False, process_index=p,
                            process_count=process_count, **kw)

    def stats_fn():
        one_epoch = dataset(epochs=1) if train else dataset(full_rows=False)
        return dataclasses.replace(stats, padding_ratio=padding_ratio(one_epoch))

    num_batches = empty = None
    if not train:
        # Every process must run the same number of eval steps; packing makes the count
        # depend on the lengths, so count each shard's batches.
        if d.padding == "pack":
            counts = [sum(1 for _ in dataset(p)) for p in range(process_count)]
        else:
            counts = [math.ceil(len(range(p, len(examples), process_count)) / local_batch)
                      for p in range(process_count)]
        num_batches = max(counts)
        width = LONGEST_MULTIPLE if d.padding == "longest" else d.max_length
        empty = {k: np.zeros((local_batch, min(width, d.max_length)), np.int32) for k in FIELDS}
    return Loader(dataset, stats_fn, train=train, num_batches=num_batches, empty_batch=empty)



def eager_load_split(cfg: Config, split: str) -> tuple[list[dict], int]:
    """Today's load_split: every record read, the split made over the records kept."""
    d = cfg.data
    if split == "valid" and d.valid_file:
        return tasks.read_records(d.task, data_path(cfg, d.valid_file), d.fields, d.chat_format)
    records, skipped = tasks.read_records(d.task, data_path(cfg, d.train_file), d.fields,
                                          d.chat_format)
    if not d.valid_file:
        if d.task in ("alpaca", "instruct"):
            train, valid, _ = split_alpaca(records, d.seed)
        else:
            order = list(range(len(records)))
            random.Random(d.seed).shuffle(order)
            n_valid = max(1, int(len(records) * HOLDOUT_FRACTION))
            held = set(order[:n_valid])
            train = [r for i, r in enumerate(records) if i not in held]
            valid = [r for i, r in enumerate(records) if i in held]
        records = train if split == "train" else valid
    if split == "train" and d.limit:
        records = records[:d.limit]
    return records, skipped
