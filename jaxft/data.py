"""Records to encoded examples: splits by index over a random-access source, the run's
tokenizer, and the one transform from a record to ids + loss mask + filter flags.

Nothing is tokenised up front. A split is a list of record indices into a source
(jaxft/source.py: JSONL through a cached line-offset index, CSV / JSON / Parquet parsed to
rows); `Encoder` (the Grain map of jaxft/batches.py) reads, templates and tokenises one record
when the pipeline reaches it. Dropped examples (over-long with overlong=drop, or no target
left) are encoded as markers, filtered after the map, which keeps worker output in order.
Before training, the first records of the process's shards are encoded (check_sample) so a
config that leaves no examples fails in seconds.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxft.config import Config, DataConfig, data_path
from jaxft.errors import ConfigError, DataError
from jaxft.source import RecordSource
from jaxft.tasks.instruct import split_alpaca
from jaxft.chat import apply_override, get_template
from jaxft.templates import tokenize_example
from jaxft.tokenizer import load_tokenizer, train_sentencepiece

FINGERPRINT_BYTES = 1 << 20  # read from each end of a data file for its fingerprint
SPLITS = ("train", "valid", "test")  # test: ch07's 10 % for alpaca/instruct
HOLDOUT_FRACTION = 0.05  # share of train held out as validation when valid_file is ""
SAMPLE = 256  # records of a shard encoded before training to find "no examples left"
TRUNCATED, DROPPED, NO_TARGET, SKIPPED = range(4)  # positions in an encoded example's flags
EMPTY = np.zeros(0, np.int32)


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

    def count(self, ex: dict) -> None:
        """Adds one encoded example (kept, dropped or skipped) to the counts."""
        t, dropped, no_target, skipped = (int(x) for x in ex["flags"])
        self.truncated += t
        self.dropped += dropped
        self.no_target += no_target
        self.skipped_empty += skipped
        if not (dropped or skipped):
            self.examples += 1
            self.tokens += len(ex["ids"]) - 1
            self.target_tokens += int(ex["mask"][1:].sum())


@dataclass
class Split:
    """The records of one split: split[i] is source[indices[i]], read on access (None for a
    record the reader skips). Only indices are held, so a split of a million records costs
    8 MB until its records are read."""
    source: Any  # source[j] -> record | None
    indices: np.ndarray  # int64 positions in source, in split order

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict | None:
        return self.source[int(self.indices[i])]

    def __iter__(self) -> Iterator[dict | None]:
        return (self[i] for i in range(len(self)))


def _holdout(n: int, d: DataConfig, split: str) -> np.ndarray:
    """Indices of a split made out of the train file, by index: the 85/5/10 train/valid/test
    split for alpaca/instruct, a seeded HOLDOUT_FRACTION for other tasks (whose "test" is
    their valid split: they hold out one set)."""
    if d.task in ("alpaca", "instruct"):
        train, valid, test = split_alpaca(range(n), d.seed)
        return np.asarray({"train": train, "valid": valid, "test": test}[split], np.int64)
    order = list(range(n))
    random.Random(d.seed).shuffle(order)
    held = np.zeros(n, bool)
    held[order[:max(1, int(n * HOLDOUT_FRACTION))]] = True
    return np.flatnonzero(~held if split == "train" else held).astype(np.int64)


def open_split(cfg: Config, split: str) -> Split:
    """The train, valid or test split of cfg.data, lazily: no record is read or tokenised here.

    With valid_file "" the validation records come out of the train file (see _holdout); the
    split is made over the file's records by index, skipped records included, so it never
    needs to read them. data.limit keeps the first N training records.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    d = cfg.data
    name = d.valid_file if split != "train" and d.valid_file else d.train_file
    source = RecordSource(d.task, data_path(cfg, name), d.fields, d.chat_format)
    indices = (_holdout(len(source), d, split) if not d.valid_file
               else np.arange(len(source), dtype=np.int64))
    if split == "train" and d.limit:
        indices = indices[:d.limit]
    return Split(source, indices)


def load_split(cfg: Config, split: str) -> tuple[list[dict], int]:
    """open_split read whole: (records, skipped), for the small splits evaluation reads."""
    s = open_split(cfg, split)
    records = [r for r in s if r is not None]
    if not records:
        raise DataError(f"{s.source.path}: no usable records in the {split} split "
                        f"({len(s)} empty examples skipped)")
    return records, len(s) - len(records)


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
        records = [r for r in (open_split(cfg, "train") if records is None else records) if r]
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


def encode_one(tok, template, rec: dict | None, d: DataConfig) -> dict:
    """{"ids", "mask", "flags"}: the int32 tokens and loss mask of one record after d.overlong,
    and flags[TRUNCATED, DROPPED, NO_TARGET, SKIPPED]; dropped / skipped ones have no ids."""
    flags_ = np.zeros(4, np.int32)

    def marker(*which):
        flags_[list(which)] = 1
        return {"ids": EMPTY, "mask": EMPTY, "flags": flags_}
    if rec is None:
        return marker(SKIPPED)
    keep = d.max_length + 1  # inputs and targets are both max_length after the shift
    ex = tokenize_example(tok, template, rec, train_on=d.train_on)
    if len(ex["ids"]) > keep and d.overlong == "truncate" and hasattr(template, "fit"):
        # Conversations lose whole turns from the end; one whose first reply is already
        # too long is dropped (both counted as truncated / dropped).
        ex = template.fit(tok, rec, d.train_on, keep)
        if ex is None:
            return marker(DROPPED)
        flags_[TRUNCATED] = 1
    ids = np.asarray(ex["ids"], np.int32)
    mask = np.asarray(ex["mask"], np.int32)
    if len(ids) > keep:
        if d.overlong == "drop":
            return marker(DROPPED)
        ids, mask = ids[:keep], mask[:keep]
        flags_[TRUNCATED] = 1
    if not mask[1:].any():
        return marker(DROPPED, NO_TARGET)
    return {"ids": ids, "mask": mask, "flags": flags_}


class Encoder:
    """The Grain map: position i of `records` -> encode_one. Picklable, for worker processes."""

    def __init__(self, records, tok, template, d: DataConfig):
        self.records, self.tok, self.template, self.d = records, tok, template, d

    def __call__(self, i) -> dict:
        return encode_one(self.tok, self.template, self.records[int(i)], self.d)


def no_examples(n: int, stats: DataStats, d: DataConfig, sampled: bool = False) -> DataError:
    what = (f"the first {n} records of this process's shard (checked before training; the rest "
            "are read as training reaches them)" if sampled else f"{n} records")
    return DataError(
        f"no examples left after filtering {what} (max_length={d.max_length}, overlong="
        f"{d.overlong}): {stats.truncated} truncated, {stats.dropped} dropped, "
        f"{stats.no_target} of them without a target token, {stats.skipped_empty} skipped empty")


def check_sample(encoder: Encoder, positions, d: DataConfig) -> DataStats:
    """Encodes the first SAMPLE positions in order: no example kept among them is the "no
    examples left" error, found in seconds at any dataset size; their counts are returned
    (the trainer reports them in its first lines)."""
    stats, n = DataStats(), 0
    for i in itertools.islice(positions, SAMPLE):
        stats.count(encoder(i))
        n += 1
    if not stats.examples:
        raise no_examples(n, stats, d, sampled=True)
    return stats


def encode_records(tok, template, records: list[dict], d: DataConfig,
                   skipped_empty: int = 0) -> tuple[list[dict], DataStats]:
    """Tokenises every record at once into {"ids", "mask"} (the eager path: validation,
    tools); drops what encode_one drops. Raises DataError when nothing is left."""
    stats = DataStats(skipped_empty=skipped_empty)
    out = []
    for rec in records:
        ex = encode_one(tok, template, rec, d)
        stats.count(ex)
        if is_kept(ex):
            out.append({"ids": ex["ids"], "mask": ex["mask"]})
    if not out:
        raise no_examples(len(records), stats, d)
    return out, stats


def is_kept(ex: dict) -> bool:
    return not (ex["flags"][DROPPED] or ex["flags"][SKIPPED])


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


