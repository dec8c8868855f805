"""Sampling for `clipbeam index`: which row groups are read, and reading exactly the chosen rows."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbeam.index import IndexInputError
from clipbeam.index.plan import SAMPLE_READ_FACTOR, SampleRead, plan_sample, sample_groups, sample_reads
from clipbeam.index.sample import read_sample
from clipbeam.layout.embeddings.read import InputFile, iter_batches, read_rows, read_vectors, resolve_embeddings

DIM = 6


def _write(path, vectors, null_rows=(), fixed=False, row_group_size=7):
    n = len(vectors)
    mask = np.zeros(n, bool)
    mask[list(null_rows)] = True
    if fixed:
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), DIM)
    else:
        offsets = pa.array(np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel(), pa.float16()), mask=pa.array(mask))
    table = pa.table({"id": pa.array([f"r{i}" for i in range(n)]), "v": column})
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.mark.parametrize("fixed", [False, True])
def test_read_rows_equals_reading_row_by_row(tmp_path, fixed):
    vectors = np.random.default_rng(0).standard_normal((50, DIM)).astype(np.float16).astype(np.float32)
    nulls = () if fixed else (3, 21, 22, 49)
    _write(tmp_path / "a.parquet", vectors, nulls, fixed)
    file = resolve_embeddings(str(tmp_path / "a.parquet"), "v").files[0]
    assert file.row_groups == (7, 7, 7, 7, 7, 7, 7, 1) and file.id_start == 0
    file = InputFile(file.url, file.rows, 1000, file.row_groups)
    rows = np.array([0, 3, 6, 7, 20, 21, 30, 31, 32, 49])
    for batch_rows in (3, 7, 65_536):  # batches that cross row groups, match them, or hold all of them
        got, ids = read_rows(file, "v", DIM, rows, batch_rows)
        expected_rows = [r for r in rows if r not in nulls]
        reference = pq.read_table(tmp_path / "a.parquet").column("v").to_pylist()
        assert ids.tolist() == [1000 + r for r in expected_rows]
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.array([reference[r] for r in expected_rows], np.float32))
    with pytest.raises(IndexInputError, match="50 rows"):
        read_rows(file, "v", DIM, np.array([10, 50]))


def test_read_rows_decodes_only_the_row_groups_it_needs(tmp_path):
    vectors = np.random.default_rng(2).standard_normal((28, DIM)).astype(np.float16).astype(np.float32)
    path = tmp_path / "a.parquet"
    _write(path, vectors, fixed=True)  # row groups of 7 rows: 0-6, 7-13, 14-20, 21-27
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 40
    data[start:start + 64] = b"\xff" * 64  # vector pages of row group 1 no longer decode
    path.write_bytes(bytes(data))
    file = resolve_embeddings(str(path), "v").files[0]
    got, ids = read_rows(file, "v", DIM, np.array([2, 22, 27]))
    assert ids.tolist() == [2, 22, 27]
    np.testing.assert_array_equal(got, vectors[[2, 22, 27]])
    with pytest.raises(OSError, match="page header"):  # a row of group 1 needs it
        read_rows(file, "v", DIM, np.array([2, 8]))


def _files(groups_per_file, group_size, count):
    files, start = [], 0
    for i in range(count):
        files.append(InputFile(f"f{i}", groups_per_file * group_size, start, (group_size,) * groups_per_file))
        start += groups_per_file * group_size
    return files


def test_sample_groups_hold_twice_the_sample_spread_over_the_input():
    files = _files(5, 100, 20)  # 100 row groups, 10,000 rows
    groups = sample_groups(files, 500, np.random.default_rng(0))
    held = sum(size for _, size in groups)
    assert SAMPLE_READ_FACTOR * 500 <= held <= SAMPLE_READ_FACTOR * 500 + 100
    firsts = sorted(first for first, _ in groups)
    assert firsts[0] < 1000 and firsts[-1] >= 9000  # from the first tenth to the last tenth
    assert len({first // 500 for first in firsts}) == len(firsts)  # never two groups of one file
    # when the sample needs over half the rows, every group is read
    assert len(sample_groups(files, 5000, np.random.default_rng(0))) == 100


def test_plan_sample_draws_only_from_the_sampled_groups():
    files = _files(5, 100, 20)
    train, queries = plan_sample(files, 400, 100, seed=3)
    assert len(train) == 400 and len(queries) == 100 and not set(train) & set(queries)
    again = plan_sample(files, 400, 100, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(queries, again[1])
    groups = {first // 100 for first, _ in sample_groups(files, 500, np.random.default_rng(3))}
    assert {i // 100 for i in np.concatenate([train, queries])} <= groups
    assert len(groups) == 10
    # files without known row groups count as one group each
    whole = [InputFile(f.url, f.rows, f.id_start) for f in files]
    train, queries = plan_sample(whole, 400, 100, seed=3)
    assert len({i // 500 for i in np.concatenate([train, queries])}) == 2


def test_read_sample_splits_train_and_queries(tmp_path):
    vectors = np.random.default_rng(1).standard_normal((60, DIM)).astype(np.float16).astype(np.float32)
    for part in range(3):
        _write(tmp_path / f"p{part}.parquet", vectors[part * 20:(part + 1) * 20], null_rows=(5,) if part == 1 else ())
    files = resolve_embeddings(str(tmp_path), "v").files
    train_ids, query_ids = plan_sample(files, 40, 10, seed=0)
    sample = read_sample(sample_reads(files, train_ids, query_ids), "v", DIM, batch_rows=4)
    null_id = 25
    expected_train = [i for i in train_ids if i != null_id]
    expected_queries = [i for i in query_ids if i != null_id]
    np.testing.assert_array_equal(sample.train, vectors[expected_train])
    assert sample.query_ids.tolist() == expected_queries
    np.testing.assert_array_equal(sample.queries, vectors[expected_queries])


def test_vectors_read_once_give_the_same_batches_and_sample(tmp_path):
    """An in-process build keeps each file's vectors (read_vectors) and takes the sample and the shards'
    batches from them: the same rows, ids, vectors, metadata and null counts as reading the file again."""
    vectors = np.random.default_rng(2).standard_normal((60, DIM)).astype(np.float32)
    path = tmp_path / "a.parquet"
    _write(path, vectors, null_rows=(0, 13, 14, 59))
    file = InputFile(str(path), 60, 100, tuple([7] * 8 + [4]))
    stored = read_vectors(file, "v", DIM)
    for start, end, batch_rows in [(0, 60, 16), (5, 41, 9), (13, 15, 4)]:
        again = list(iter_batches(file, "v", "id", [], DIM, start, end, batch_rows))
        kept = list(iter_batches(file, "v", "id", [], DIM, start, end, batch_rows, stored=stored))
        assert len(again) == len(kept) > 0
        for a, b in zip(again, kept, strict=True):
            assert a.ids.tolist() == b.ids.tolist() and a.skipped == b.skipped and a.metadata.equals(b.metadata)
            np.testing.assert_array_equal(a.vectors, b.vectors)
    read = SampleRead(file, np.array([0, 3, 14, 20, 58]), np.array([13, 30, 59]))
    from_file = read_sample((read,), "v", DIM)
    from_memory = read_sample((read,), "v", DIM, stored={file.url: stored})
    for field in ("train", "query_ids", "queries"):
        np.testing.assert_array_equal(getattr(from_file, field), getattr(from_memory, field))
    assert from_memory.query_ids.tolist() == [130]
