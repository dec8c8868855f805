"""Pure planning: which rows go to which shard, which rows train and which test.

No I/O here, so the plans are unit-tested on their own. Shards cover
contiguous global id ranges, so a shard's id table maps ids to rows by
position, and `lookup` finds a shard by binary search on the range starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clipbeam.errors import FieldError
from clipbeam.layout.embeddings.read import InputFile

SAMPLE_READ_FACTOR = 2  # sampled row groups hold at least twice the sample, so rows are still drawn at random


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_end) of one input file."""

    file: InputFile
    row_start: int
    row_end: int


@dataclass(frozen=True)
class ShardPlan:
    """Shard `number` holds global ids [id_start, id_end), read from `pieces`."""

    number: int
    id_start: int
    id_end: int
    pieces: tuple[Piece, ...]


def shard_count(total: int, shards: int | None = None, shard_size: int | None = None) -> int:
    """How many shards: `shard_size` rows each when given, else `shards`, never more than rows."""
    if shard_size is not None:
        if shard_size < 1:
            raise FieldError("shard_size", f"{{field}} must be at least 1, not {shard_size}")
        return max(1, math.ceil(total / shard_size))
    shards = 1 if shards is None else shards
    if shards < 1:
        raise FieldError("shards", f"{{field}} must be at least 1, not {shards}")
    return max(1, min(shards, total))


def plan_shards(files: list[InputFile], count: int, first_number: int = 0) -> list[ShardPlan]:
    """Split the files' global id range into `count` contiguous, nearly equal shards."""
    if not files:
        return []
    start = files[0].id_start
    total = files[-1].id_start + files[-1].rows - start
    bounds = [start + (total * i) // count for i in range(count + 1)]
    plans = []
    for number in range(count):
        lo, hi = bounds[number], bounds[number + 1]
        pieces = []
        for file in files:
            a, b = max(lo, file.id_start), min(hi, file.id_start + file.rows)
            if a < b:
                pieces.append(Piece(file, a - file.id_start, b - file.id_start))
        plans.append(ShardPlan(first_number + number, lo, hi, tuple(pieces)))
    return plans


def query_count(total: int, wanted: int) -> int:
    """Held-out queries: `wanted`, but at most a tenth of the collection (at least 1)."""
    return max(1, min(wanted, total // 10))


def _row_groups(files: list[InputFile]) -> list[tuple[int, int]]:
    """Every row group as (first global id, rows), in id order; a file without known groups is one group."""
    groups = []
    for file in files:
        start = file.id_start
        for size in file.row_groups or (file.rows,):
            groups.append((start, size))
            start += size
    return groups


def sample_groups(files: list[InputFile], wanted: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Row groups, spread evenly over the id range, holding at least SAMPLE_READ_FACTOR x `wanted` rows.

    All groups when that is more than the input has. Evenly spread (a random offset, then a fixed
    stride) so that inputs ordered by source or class are still sampled across their whole range.
    """
    groups = _row_groups(files)
    total = sum(size for _, size in groups)
    if SAMPLE_READ_FACTOR * wanted >= total:
        return groups
    count = min(len(groups), math.ceil(len(groups) * SAMPLE_READ_FACTOR * wanted / total))
    picked = np.unique(((np.arange(count) + rng.random()) * len(groups) / count).astype(np.int64))
    rest = rng.permutation(np.setdiff1d(np.arange(len(groups)), picked))
    held = int(sum(groups[g][1] for g in picked))
    extra = []
    for g in rest:
        if held >= SAMPLE_READ_FACTOR * wanted:
            break
        extra.append(g)
        held += groups[g][1]
    return [groups[g] for g in sorted([*picked.tolist(), *extra])]


def plan_sample(files: list[InputFile], train: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random global ids for training and for tuning queries (each sorted), reproducible by seed.

    Both are drawn uniformly from the rows of `sample_groups`, so reading them decodes about twice
    the sample, not the whole input (Parquet decodes whole pages; one row costs its row group).
    """
    start = files[0].id_start
    total = files[-1].id_start + files[-1].rows - start
    queries = min(queries, total)
    train = min(train, total - queries)
    rng = np.random.default_rng(seed)
    pool = np.concatenate([np.arange(first, first + size, dtype=np.int64)
                           for first, size in sample_groups(files, train + queries, rng)])
    chosen = rng.choice(pool, size=train + queries, replace=False)
    return np.sort(chosen[queries:]), np.sort(chosen[:queries])


def rows_by_file(files: list[InputFile], ids: np.ndarray) -> dict[int, np.ndarray]:
    """Global ids (sorted) -> {file position: local row numbers}."""
    starts = np.array([f.id_start for f in files], dtype=np.int64)
    where = np.searchsorted(starts, ids, side="right") - 1
    return {int(i): ids[where == i] - files[i].id_start for i in np.unique(where)}


@dataclass(frozen=True)
class SampleRead:
    """The local rows of one file that train the index and that serve as tuning queries (both sorted)."""

    file: InputFile
    train_rows: np.ndarray
    query_rows: np.ndarray


def sample_reads(files: list[InputFile], train_ids: np.ndarray, query_ids: np.ndarray) -> tuple[SampleRead, ...]:
    """One read per file that holds sampled rows: its training rows and query rows together."""
    train, queries = rows_by_file(files, train_ids), rows_by_file(files, query_ids)
    empty = np.zeros(0, np.int64)
    return tuple(SampleRead(file, train.get(i, empty), queries.get(i, empty))
                 for i, file in enumerate(files) if i in train or i in queries)
