"""Peak memory of reading one manifest part, against the part's size (issue 12).

Writes an N-row manifest (Parquet with ONE row group, CSV, JSONL; an image
path, a caption and a 1000-byte padding column per row) and reads the last
part of each size in --parts with
  clipbeam   the last part as `clipbeam embed` plans it (corpus.plan.plan_parts) and reads
             it (manifest_table.read_manifest_table: Parquet row groups in small batches,
             CSV/JSONL only the part's own byte range)
  baseline   what the reader did before: the whole overlapping row group (Parquet)
             or the whole file (CSV/JSONL), then a slice
Peak memory is Arrow's allocator peak plus Python's (tracemalloc), each read in
its own fresh process. A part's memory should follow its size, not the file's.
Usage: python benchmarks/manifest_part_memory.py [--n 20000] [--parts 100 1000 10000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from clipbeam.corpus.manifest_table import read_manifest_table
from clipbeam.corpus.plan import plan_parts


def write_manifests(folder: str, n: int) -> dict[str, str]:
    table = pa.table({"image": [f"images/{i:08d}.jpg" for i in range(n)],
                      "caption": [f"caption number {i}" for i in range(n)],
                      "pad": [(str(i) * 200)[:1000] for i in range(n)]})
    paths = {kind: os.path.join(folder, f"rows.{kind}") for kind in ("parquet", "csv", "jsonl")}
    pq.write_table(table, paths["parquet"], row_group_size=n)
    pacsv.write_csv(table, paths["csv"])
    with open(paths["jsonl"], "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in table.to_pylist())
    return paths


def baseline(path: str, start: int, stop: int) -> pa.Table:
    """The reader before the fix: a whole row group (one here) or a whole file, then a slice."""
    if path.endswith(".parquet"):
        return pq.ParquetFile(path).read_row_groups([0]).slice(start, stop - start)
    with open(path, "rb") as handle:
        table = pacsv.read_csv(handle) if path.endswith(".csv") else pajson.read_json(handle)
    return table.slice(start, stop - start)


def _measure(which: str, path: str, start: int, stop: int, byte_range: tuple[int, int] | None) -> float:
    """Peak MB of one read, in a fresh process (Arrow's pool peak is per process and only grows)."""
    read = read_manifest_table if which == "clipbeam" else baseline
    args = (path, None, start, stop, byte_range) if which == "clipbeam" else (path, start, stop)
    pool = pa.default_memory_pool()
    before = pool.max_memory()
    tracemalloc.start()
    result = read(*args)
    python_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert result.num_rows == stop - start
    return (python_peak + max(0, pool.max_memory() - before)) / 1e6


def peak_mb(which: str, path: str, start: int, stop: int, byte_range: tuple[int, int] | None = None) -> float:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_measure, which, path, start, stop, byte_range).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--parts", type=int, nargs="+", default=[100, 1000, 10_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_manifests(folder, args.n)
        print(f"{'format':8} {'part rows':>9} {'file MB':>8} {'baseline MB':>12} {'clipbeam MB':>12}")
        for kind, path in paths.items():
            size = os.path.getsize(path) / 1e6
            for rows in args.parts:
                last = plan_parts([path], rows_per_part=rows)[-1]  # as embed plans it (CSV/JSONL: byte range)
                start, stop = last.start, last.stop
                ours = peak_mb("clipbeam", path, start, stop, last.byte_range)
                theirs = peak_mb("baseline", path, start, stop)
                print(f"{kind:8} {rows:>9} {size:>8.1f} {theirs:>12.1f} {ours:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
