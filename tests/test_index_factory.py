"""The `auto` factory rule (one test per branch), memory budgets and sample/shard planning."""

import numpy as np
import pytest

from clipbeam.index import IndexInputError, choose_factory, parse_memory
from clipbeam.index.factory import default_train_sample, ivf_lists
from clipbeam.index.faiss_io import make_index
from clipbeam.index.plan import plan_sample, plan_shards, rows_by_file, shard_count
from clipbeam.layout.embeddings.read import InputFile

GB = 1 << 30


@pytest.mark.parametrize("text,size", [("4GB", 4 * GB), ("512MB", 512 << 20), ("1.5G", int(1.5 * GB)),
                                       ("100", 100), ("2 KiB", 2048), (1234, 1234)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "4XB", "-1GB", "0", "lots"])
def test_parse_memory_rejects(text):
    with pytest.raises(IndexInputError):
        parse_memory(text)


def test_small_collection_is_exact():
    assert choose_factory(5_000, 512, 4 * GB).factory == "Flat"


def test_flat_that_does_not_fit_is_not_chosen():
    assert choose_factory(5_000, 512, 1 << 20).factory != "Flat"


def test_medium_collection_gets_hnsw():
    choice = choose_factory(50_000, 512, 4 * GB)
    assert choice.factory == "HNSW32" and "graph" in choice.reason


def test_large_collection_gets_ivf_flat():
    assert choose_factory(2_000_000, 512, 16 * GB).factory == f"IVF{ivf_lists(2_000_000)},Flat"


def test_many_lists_get_hnsw_quantizer():
    assert choose_factory(300_000_000, 512, 1024 * GB).factory == "IVF65536_HNSW32,Flat"


def test_tight_budget_gets_pq_without_rotation():
    choice = choose_factory(200_000, 512, 32 << 20)
    assert choice.factory == "IVF1024,PQ128x8" and choice.estimated_bytes <= 32 << 20


def test_tighter_budget_gets_opq():
    choice = choose_factory(200_000, 512, 20 << 20)
    assert choice.factory == "OPQ64_256,IVF1024,PQ64x8" and choice.estimated_bytes <= 20 << 20


def test_impossible_budget_is_a_usage_error():
    with pytest.raises(IndexInputError, match="too small"):
        choose_factory(10_000_000, 512, 1 << 20)


@pytest.mark.parametrize("n,dim,budget", [(5_000, 512, 4 * GB), (50_000, 64, 4 * GB), (200_000, 512, 20 << 20),
                                          (200_000, 100, 10 << 20), (200_000, 512, 32 << 20)])
def test_every_auto_choice_builds(n, dim, budget):
    make_index(choose_factory(n, dim, budget).factory, dim, "ip")


def test_unknown_factory():
    with pytest.raises(IndexInputError, match="unknown or invalid index factory"):
        make_index("IVF12,Bogus", 32, "ip")


def test_train_sample():
    assert default_train_sample("IVF1024,Flat", 10**6) == 64 * 1024
    assert default_train_sample("OPQ64_256,IVF256,PQ64x8", 10**6) == 65_536
    assert default_train_sample("IVF1024,PQ8", 1000) == 1000
    assert default_train_sample("HNSW32", 10**6) == 0


def _files(*rows):
    out, start = [], 0
    for i, r in enumerate(rows):
        out.append(InputFile(f"f{i}", r, start))
        start += r
    return out


def test_plan_shards_covers_every_row_once():
    files = _files(10, 0, 7, 13)
    plans = plan_shards([f for f in files if f.rows], shard_count(30, shards=4), first_number=2)
    assert [p.number for p in plans] == [2, 3, 4, 5]
    seen = []
    for p in plans:
        assert sum(x.row_end - x.row_start for x in p.pieces) == p.id_end - p.id_start
        for piece in p.pieces:
            seen.extend(range(piece.file.id_start + piece.row_start, piece.file.id_start + piece.row_end))
    assert seen == list(range(30))


def test_shard_count():
    assert shard_count(3, shards=8) == 3
    assert shard_count(100, shard_size=30) == 4
    with pytest.raises(IndexInputError):
        shard_count(100, shards=0)


def test_plan_sample_is_disjoint_and_reproducible():
    files = _files(100, 50, 50)
    train, queries = plan_sample(files, 80, 20, seed=1)
    assert len(train) == 80 and len(queries) == 20 and not set(train) & set(queries)
    again = plan_sample(files, 80, 20, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(queries, again[1])
    grouped = rows_by_file(files, queries)
    assert sum(len(v) for v in grouped.values()) == 20
    assert all(v.max() < files[i].rows for i, v in grouped.items())
