"""Pure planning: which rows go to which shard, which rows train and which test.

No I/O here, so the plans are unit-tested on their own. Shards cover
contiguous global id ranges, so a shard's id table maps ids to rows by
position, and `lookup` finds a shard by binary search on the range starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from clipbeam.index.errors import IndexInputError
from clipbeam.index.inputs import InputFile


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
            raise IndexInputError(f"--shard-size must be at least 1, not {shard_size}")
        return max(1, math.ceil(total / shard_size))
    shards = 1 if shards is None else shards
    if shards < 1:
        raise IndexInputError(f"--shards must be at least 1, not {shards}")
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


def plan_sample(files: list[InputFile], train: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint random global ids for training and for tuning queries (each sorted), reproducible by seed."""
    start = files[0].id_start
    total = files[-1].id_start + files[-1].rows - start
    queries = min(queries, total)
    train = min(train, total - queries)
    chosen = np.random.default_rng(seed).choice(total, size=train + queries, replace=False) + start
    return np.sort(chosen[queries:]), np.sort(chosen[:queries])


def rows_by_file(files: list[InputFile], ids: np.ndarray) -> dict[int, np.ndarray]:
    """Global ids (sorted) -> {file position: local row numbers}."""
    starts = np.array([f.id_start for f in files], dtype=np.int64)
    where = np.searchsorted(starts, ids, side="right") - 1
    return {int(i): ids[where == i] - files[i].id_start for i in np.unique(where)}
