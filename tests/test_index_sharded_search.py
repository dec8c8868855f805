"""Batched sharded search: one numpy merge for a whole batch equals searching query by query.

Shards are built the way `clipbeam index` builds them (one trained empty
index copied into every shard, global ids added with add_with_ids), with
shards smaller than k, for every kind of factory the auto rule picks and both
metrics. The reference merges each query's per-shard results in plain Python.
"""

import faiss
import numpy as np
import pytest
from synthetic_embeddings import clustered

from clipbeam.index import ShardedIndex
from clipbeam.index.faiss_io import make_index
from clipbeam.index.sharded import shared_coarse
from clipbeam.index.topk import merge_topk

DIM = 16
FACTORIES = ["IVF8,Flat", "Flat", "HNSW8", "PCA16,IVF8,PQ4x4", "IVF8_HNSW4,Flat"]
SHARD_SIZES = [300, 5, 250, 1, 180]  # k=12 is more than two of them hold


def sharded(factory: str, metric: str, params: str) -> tuple[ShardedIndex, np.ndarray]:
    vectors = clustered(sum(SHARD_SIZES), DIM, clusters=6, seed=4)
    trained = make_index(factory, DIM, metric)
    trained.train(vectors)
    shards, entries, start = [], [], 0
    for size in SHARD_SIZES:
        shard = faiss.deserialize_index(faiss.serialize_index(trained))
        shard.add_with_ids(vectors[start:start + size], np.arange(start, start + size, dtype=np.int64))
        shards.append(shard)
        entries.append({"id_start": start, "id_end": start + size})
        start += size
    manifest = {"dim": DIM, "metric": metric, "search_params": params, "shards": entries}
    return ShardedIndex("memory://unused", manifest, shards), vectors


def reference(index: ShardedIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every shard's own search of `queries`, merged query by query by (score, then smaller id) in Python."""
    per_shard = [shard.search(queries, k) for shard in index.shards]
    worst = -np.inf if index.metric == "ip" else np.inf
    out_scores, out_ids = [], []
    for row in range(len(queries)):
        found = [(float(s), int(i)) for scores, ids in per_shard
                 for s, i in zip(scores[row], ids[row], strict=True) if i >= 0]
        found = sorted(found, key=lambda pair: (-pair[0] if index.metric == "ip" else pair[0], pair[1]))[:k]
        out_scores.append([s for s, _ in found] + [worst] * (k - len(found)))
        out_ids.append([i for _, i in found] + [-1] * (k - len(found)))
    return np.array(out_scores, dtype=np.float32), np.array(out_ids, dtype=np.int64)


@pytest.fixture(autouse=True)
def same_distance_kernel(monkeypatch):
    """faiss scores batches of 20+ queries with BLAS and fewer without, which differ in the last bit:
    that is faiss's own batch dependence, not the merge's, so both sides use one kernel here."""
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1 << 30)


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def faiss_threads(request):
    """With several threads, IVF batches are cut into one slice per thread (as faiss cuts them)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(request.param)
    yield request.param
    faiss.omp_set_num_threads(before)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("factory", FACTORIES)
def test_batched_search_equals_per_query_search(factory, metric, faiss_threads):
    params = {"IVF8,Flat": "nprobe=2", "HNSW8": "efSearch=16", "PCA16,IVF8,PQ4x4": "nprobe=3",
              "IVF8_HNSW4,Flat": "nprobe=2,quantizer_efSearch=16"}.get(factory, "")
    index, vectors = sharded(factory, metric, params)
    assert (index._coarse is not None) == ("IVF" in factory)
    assert (index._coarse is not None and index._coarse.stacked is not None) == factory.endswith(",Flat")
    queries = np.concatenate([vectors[::37], clustered(20, DIM, seed=9)])
    k = 12
    scores, ids = index.search(queries, k)
    want_scores, want_ids = reference(index, queries, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores)
    one = [index.search(query, k) for query in queries]
    one_scores, one_ids = np.concatenate([s for s, _ in one]), np.concatenate([i for _, i in one])
    np.testing.assert_array_equal(one_ids, ids)
    if "PQ" in factory:  # PCA's projection and PQ's tables are matrix products: faiss's own
        np.testing.assert_allclose(one_scores, scores, rtol=1e-6, atol=1e-6)  # last bit depends on the batch size
    else:
        np.testing.assert_array_equal(one_scores, scores)
    assert (ids >= 0).all(), "every query finds k results among five shards"
    if "IVF" in factory:  # more probes than lists: faiss clamps them
        index.set_search_params("nprobe=64")
        scores, ids = index.search(queries, k)
        want_scores, want_ids = reference(index, queries, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_duplicates_across_shards_tie_at_the_cut_and_go_to_the_smaller_id(metric, faiss_threads):
    """IVF-Flat shards are scanned as one stacked index; ties at the k-th place are redone exactly."""
    vectors = clustered(40, DIM, clusters=4, seed=2)
    trained = make_index("IVF2,Flat", DIM, metric)
    trained.train(np.concatenate([vectors] * 3))
    shards, entries = [], []
    for copy in range(3):  # the same 40 vectors in every shard: every score comes three times
        shard = faiss.deserialize_index(faiss.serialize_index(trained))
        shard.add_with_ids(vectors, np.arange(copy * 40, copy * 40 + 40, dtype=np.int64))
        shards.append(shard)
        entries.append({"id_start": copy * 40, "id_end": copy * 40 + 40})
    index = ShardedIndex("memory://unused", {"dim": DIM, "metric": metric, "search_params": "nprobe=1",
                                             "shards": entries}, shards)
    assert index._coarse.stacked is not None
    for k in (1, 2, 4, 5, 200):
        scores, ids = index.search(vectors, k)
        want_scores, want_ids = reference(index, vectors, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


def test_shards_with_another_quantizer_are_searched_one_by_one():
    index, vectors = sharded("IVF8,Flat", "ip", "nprobe=1")
    other = make_index("IVF8,Flat", DIM, "ip")
    other.train(clustered(400, DIM, clusters=6, seed=11))
    other.add_with_ids(vectors[:3], np.arange(1000, 1003, dtype=np.int64))
    assert shared_coarse(index.shards) is not None
    assert shared_coarse([*index.shards, other]) is None


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_breaks_ties_by_id_whatever_the_part_order(metric):
    scores = [np.array([[0.5, 0.5, 0.1]], np.float32), np.array([[0.5, 0.2, 0.0]], np.float32)]
    ids = [np.array([[9, 4, 7]]), np.array([[2, 3, -1]])]
    for order in ([0, 1], [1, 0]):
        top_scores, top_ids = merge_topk([scores[i] for i in order], [ids[i] for i in order], 2, metric)
        want = [2, 4] if metric == "ip" else [7, 3]
        assert top_ids.tolist() == [want]
    _, padded = merge_topk(scores, ids, 8, metric)
    assert padded[0, 5:].tolist() == [-1, -1, -1]


def test_lookup_maps_a_batch_of_ids_in_one_call(tmp_path):
    from synthetic_embeddings import write_embed_output

    from clipbeam.cli import main

    vectors = clustered(90, DIM, seed=2)
    row_ids = write_embed_output(str(tmp_path / "emb"), vectors, parts=3, dtype=np.float32, seed=1)
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "idx"),
                 "--shards", "3", "--index-factory", "Flat"]) == 0
    index = ShardedIndex.open(str(tmp_path / "idx"))
    wanted = np.array([[89, -1, 0], [45, 10_000, 30]])
    rows = index.lookup(wanted)
    assert [r and r["id"] for r in rows] == [row_ids[89], None, row_ids[0], row_ids[45], None, row_ids[30]]
    assert rows[0]["faiss_id"] == 89 and rows[0]["caption"] == "caption 89"
