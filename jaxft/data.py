"""Grain input pipeline: records -> template + tokens + loss mask -> pack | pad -> batch.

Every record is tokenised once, up front (`encode_records`), so over-long and target-less
examples are counted and filtered before training starts. Grain then shards the encoded
examples by process, shuffles them (a new order each epoch), shifts them by one token,
packs or pads them into rows and stacks rows into batches. One batch is a dict of int32
numpy arrays of shape [local_batch, L]:

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
import hashlib
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grain
import jax
import numpy as np

from jaxft import tasks
from jaxft.config import Config, DataConfig, check_batch_split, data_path
from jaxft.errors import ConfigError, DataError
from jaxft.tasks.instruct import split_alpaca
from jaxft.chat import apply_override, get_template
from jaxft.templates import tokenize_example
from jaxft.tokenizer import load_tokenizer, train_sentencepiece

LONGEST_MULTIPLE = 16  # `longest` rows are padded to a multiple of this many tokens
PACKING_BINS = 64  # first-fit bins open at once; more bins fill rows more tightly
FINGERPRINT_BYTES = 1 << 20  # read from each end of a data file for its fingerprint
HOLDOUT_FRACTION = 0.05  # share of train held out as validation when valid_file is ""
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclass
class DataStats:
    examples: int = 0  # examples kept (all processes)
    tokens: int = 0  # input tokens of the kept examples (after truncation)
    target_tokens: int = 0  # tokens that count in the loss
    truncated: int = 0  # over-long examples cut to max_length + 1 ids
    dropped: int = 0  # examples removed: over-long with overlong=drop, or no target left
    no_target: int = 0  # of `dropped`: examples without a single target token
    skipped_empty: int = 0  # records the reader skipped for an empty field
    padding_ratio: float | None = None  # padding share of this process's rows over one epoch


def load_split(cfg: Config, split: str) -> tuple[list[dict], int]:
    """Reads the train or valid records of cfg.data; returns (records, skipped_empty).

    With valid_file "" the validation records come out of the train file: the 85/5/10
    split for alpaca/instruct, a seeded HOLDOUT_FRACTION for other tasks.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
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


def build_tokenizer(cfg: Config, records: list[dict] | None = None):
    """The run's tokenizer: cfg.data.tokenizer, else the init checkpoint's, else one trained on
    the training text; the template's special tokens are added in every case, and
    data.chat_template replaces the tokenizer's chat template."""
    d = cfg.data
    init_tok = Path(cfg.train.init).expanduser() / "tokenizer" if cfg.train.init else None
    if d.tokenizer:
        tok = load_tokenizer(Path(d.tokenizer).expanduser())
    elif init_tok is not None and init_tok.is_dir():
        tok = load_tokenizer(init_tok)
    elif d.train_tokenizer_vocab > 0:
        if records is None:
            records, _ = load_split(cfg, "train")
        instructions = {r["instruction"] for r in records if r.get("instruction")}
        texts = sorted(instructions) + [t for r in records for t in (r["input"], r["output"]) if t]
        # The caller saves the tokenizer with the model; this directory is only scratch.
        out = Path(tempfile.mkdtemp(prefix="jaxft-sp-"))
        tok = train_sentencepiece(texts, vocab_size=d.train_tokenizer_vocab, out_dir=out,
                                  seed=d.seed)
    else:
        where = f"{init_tok} does not exist" if init_tok else "train.init is empty"
        raise ConfigError(f"no tokenizer: data.tokenizer is empty, {where}, and "
                          "data.train_tokenizer_vocab is 0; set one of them")
    apply_override(tok, d.chat_template)
    template = get_template(d.template, include_instruction=d.include_instruction)
    if template.special_tokens:
        tok.add_special_tokens(list(template.special_tokens))
    return tok


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


def _file_fingerprint(path: Path) -> dict:
    """Size and SHA-256 of the first and last MiB: cheap on any size, and it changes when the
    records do (an edited, appended or swapped file)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(FINGERPRINT_BYTES)
        f.seek(max(0, size - FINGERPRINT_BYTES))
        tail = f.read()
    return {"bytes": size, "sha256_head_tail": hashlib.sha256(head + tail).hexdigest()}


def fingerprint(cfg: Config) -> dict:
    """{"data.train_file": ..., "data.valid_file": ...} of the files this run reads; a resume
    on other data is refused with it (the run dir's data.json)."""
    out = {}
    for key in ("train_file", "valid_file"):
        rel = getattr(cfg.data, key)
        if rel and (path := data_path(cfg, rel)).is_file():
            out[f"data.{key}"] = {"name": path.name, **_file_fingerprint(path)}
    return out


class Loader:
    """Batches for one process. A train loader is one endless iterator: iterating it again
    continues where it stopped, and get_state()/set_state() save and restore that point (the
    trainer keeps that state, as JSON, in every checkpoint). An eval loader makes a
    fresh in-order pass each time it is iterated, `num_batches` long on every process."""

    def __init__(self, make_dataset, stats_fn, *, train: bool, num_batches: int | None,
                 empty_batch: dict | None, counts: DataStats | None = None):
        self.counts = counts  # the filtering counts, without the padding ratio (cheap)
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


def make_loader(cfg: Config, tokenizer, records: list[dict], *, train: bool,
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

    def dataset(p=process_index, **kw):
        return _dataset(examples, d, local_batch, train=train, process_index=p,
                        process_count=process_count, **kw)

    def stats_fn():
        one_epoch = dataset(epochs=1, full_rows=False) if train else dataset(full_rows=False)
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
    return Loader(dataset, stats_fn, train=train, num_batches=num_batches, empty_batch=empty,
                  counts=stats)
