"""Reading the training sample and the held-out tuning queries, in the process that trains.

The sample goes straight from storage to the trainer: passing a few hundred MB
of vectors through a Beam shuffle costs more than reading them, since every
element is pickled, copied and gathered again. Each file that holds sampled
rows is read once for both its training rows and its queries, files a few at a
time in threads (Parquet decoding releases the GIL), and only the row groups
that `plan.sample_groups` chose are decoded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from clipbeam.index.plan import SampleRead
from clipbeam.layout.embeddings.read import StoredVectors, read_rows

READ_THREADS = 4  # files decoded at once: enough for two cores or for remote latency, memory stays a few batches


@dataclass(frozen=True)
class Sample:
    """Training vectors, and the tuning queries with their global ids (sorted by id)."""

    train: np.ndarray
    query_ids: np.ndarray
    queries: np.ndarray


def read_sample(reads: tuple[SampleRead, ...], column: str, dim: int, batch_rows: int = 65_536,
                storage_options: dict | None = None, stored: dict[str, StoredVectors] | None = None) -> Sample:
    """Read every file's sampled rows (null vectors dropped) and split them into training rows and queries.

    `stored` (file url -> its vectors, read before) takes the rows from memory instead.
    """
    def read_one(read: SampleRead) -> Sample:
        if stored is not None:  # straight from memory: no union, no second copy to split
            kept = stored[read.file.url]
            train, queries = (rows[kept.valid[rows]] for rows in (read.train_rows, read.query_rows))
            return Sample(kept.take(train), read.file.id_start + queries, kept.take(queries))
        vectors, ids = read_rows(read.file, column, dim, np.union1d(read.train_rows, read.query_rows), batch_rows,
                                 storage_options)
        is_query = np.isin(ids - read.file.id_start, read.query_rows)
        return Sample(vectors[~is_query], ids[is_query], vectors[is_query])

    if not reads:
        return Sample(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(reads))) as pool:
        parts = list(pool.map(read_one, reads))
    return Sample(np.concatenate([p.train for p in parts]), np.concatenate([p.query_ids for p in parts]),
                  np.concatenate([p.queries for p in parts]))
