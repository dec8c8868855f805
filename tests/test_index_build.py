"""`clipbeam index` and ShardedIndex end to end, on clustered synthetic embeddings."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading

import apache_beam as beam
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from synthetic_embeddings import clustered, unreadable_pages, write_embed_output, write_plain_parquet

from clipbeam.cli import main
from clipbeam.commands import index_build
from clipbeam.index import IndexInputError, ShardedIndex
from clipbeam.layout import UnitLedger
from clipbeam.transforms.index_shards import BuildShards, TuneShards

DIM = 32
RUNNER = ["--runner", "DirectRunner"]


def build(emb, out, *extra):
    return main(["index", "--embeddings", str(emb), "--output", str(out), *RUNNER, *extra])


def exact_top(vectors, queries, k):
    scores = queries @ vectors.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    vectors = clustered(3000, DIM, seed=3)
    ids = write_embed_output(str(root / "emb"), vectors, parts=3, dtype=np.float16)
    stored = vectors.astype(np.float16).astype(np.float32)
    return root / "emb", stored, ids


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16"])
def test_recall_meets_target(data, tmp_path, factory):
    emb, vectors, ids = data
    assert build(emb, tmp_path / "idx", "--index-factory", factory, "--shards", "3", "--target-recall", "0.95") == 0
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["target_reached"] and manifest["recall_at_10"] >= 0.95
    assert manifest["search_params"].startswith("nprobe=" if "IVF" in factory else "efSearch=")
    assert manifest["ntotal"] == 3000 and [s["ntotal"] for s in manifest["shards"]] == [1000, 1000, 1000]
    index = ShardedIndex.open(str(tmp_path / "idx"))
    assert index.search_params == manifest["search_params"]
    queries = vectors[np.random.default_rng(5).choice(3000, 200, replace=False)] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, found = index.search(queries, 10)
    truth = exact_top(vectors, queries.astype(np.float32), 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recall >= 0.93
    rows = index.lookup(found[0][:3])
    assert [r["id"] for r in rows] == [ids[i] for i in found[0][:3]]
    assert rows[0]["caption"] == f"caption {found[0][0]}" and rows[0]["source"].endswith(".tar")


def test_flat_in_four_shards_equals_one_flat(data, tmp_path):
    emb, vectors, _ = data
    assert build(emb, tmp_path / "one", "--index-factory", "Flat") == 0
    assert build(emb, tmp_path / "four", "--index-factory", "Flat", "--shards", "4") == 0
    one, four = ShardedIndex.open(str(tmp_path / "one")), ShardedIndex.open(str(tmp_path / "four"))
    assert len(four.shards) == 4 and four.ntotal == one.ntotal == 3000
    queries = vectors[:100] * 0.5 + vectors[100:200] * 0.5
    s1, i1 = one.search(queries, 20)
    s4, i4 = four.search(queries, 20)
    assert np.array_equal(i1, i4)
    np.testing.assert_allclose(s1, s4, rtol=1e-6)
    assert np.array_equal(i1[:, :5], exact_top(vectors, queries, 5))
    # a shard file is a plain faiss index
    plain = faiss.read_index(str(tmp_path / "four" / "shard-00002.faiss"))
    assert plain.ntotal == 750


def test_append_continues_ids_and_reuses_quantizer(tmp_path):
    a, b = clustered(2000, DIM, seed=1), clustered(1000, DIM, seed=1)[::-1] * 0.999
    write_embed_output(str(tmp_path / "a"), a, parts=2, dtype=np.float32, prefix="a")
    ids_b = write_embed_output(str(tmp_path / "b"), b, parts=1, dtype=np.float32, prefix="b")
    out = tmp_path / "idx"
    assert build(tmp_path / "a", out, "--index-factory", "IVF16,Flat", "--shards", "2") == 0
    trained_before = (out / "trained.faiss").read_bytes()
    assert build(tmp_path / "b", out, "--append") == 0
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["ntotal"] == 3000 and len(manifest["shards"]) == 3
    assert manifest["shards"][2]["id_start"] == 2000 and manifest["shards"][2]["id_end"] == 3000
    assert (out / "trained.faiss").read_bytes() == trained_before
    table = pq.read_table(out / "shard-00002.ids.parquet")
    assert table.column("faiss_id").to_pylist() == list(range(2000, 3000))
    assert table.column("id").to_pylist() == ids_b
    old, new = (faiss.read_index(str(out / name)) for name in ("shard-00000.faiss", "shard-00002.faiss"))
    centroids = [faiss.extract_index_ivf(ix).quantizer.reconstruct_n(0, 16) for ix in (old, new)]
    assert np.array_equal(*centroids)
    index = ShardedIndex.open(str(out))
    _, found = index.search(b[:50], 1)
    assert np.array_equal(found[:, 0], np.arange(2000, 2050))
    # appending the same parts again adds nothing
    assert build(tmp_path / "b", out, "--append") == 0
    assert json.loads((out / "index.json").read_text())["ntotal"] == 3000


def test_resume_rebuilds_only_missing_shards(data, tmp_path):
    emb, _, _ = data
    out = tmp_path / "idx"
    assert build(emb, out, "--index-factory", "IVF16,Flat", "--shards", "3") == 0
    first = json.loads((out / "index.json").read_text())
    assert build(emb, out, "--index-factory", "IVF16,Flat", "--shards", "3") == 0  # complete: nothing to do
    kept = (out / "shard-00000.faiss").stat().st_mtime_ns
    # simulate a run killed after shards 0 and 2: work records present, shard 1 and index.json missing
    os.makedirs(out / "_work")
    (out / "index.json").unlink()
    (out / "shard-00001.faiss").unlink()
    (out / "shard-00001.ids.parquet").unlink()
    assert build(emb, out, "--index-factory", "IVF16,Flat", "--shards", "3") == 0
    second = json.loads((out / "index.json").read_text())
    assert second["ntotal"] == first["ntotal"] and (out / "shard-00001.faiss").exists()
    assert not (out / "_work").exists()
    assert (out / "shard-00000.faiss").stat().st_mtime_ns != kept  # no work records: rebuilt from scratch
    assert build(emb, out, "--index-factory", "IVF32,Flat") == 2  # other options into a finished index


def test_plain_parquet_fixed_size_list_and_l2(tmp_path):
    vectors = clustered(1200, DIM, seed=4)
    write_plain_parquet(str(tmp_path / "pq"), vectors, files=3)
    out = tmp_path / "idx"
    assert build(tmp_path / "pq", out, "--column", "embedding", "--id-column", "key", "--metric", "l2",
                 "--keep-columns", "source", "--index-factory", "auto") == 0
    index = ShardedIndex.open(str(out))
    assert index.manifest["factory"] == "Flat" and index.metric == "l2"
    scores, found = index.search(vectors[7], 3)
    assert found[0, 0] == 7 and scores[0, 0] == pytest.approx(0, abs=1e-5)
    assert index.lookup([7, -1]) == [{"faiss_id": 7, "id": "7", "source": "file0"}, None]


def test_multiprocess_runner(data, tmp_path):
    emb, vectors, _ = data
    out = tmp_path / "idx"
    assert main(["index", "--embeddings", str(emb), "--output", str(out), "--index-factory", "Flat",
                 "--shards", "2", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]) == 0
    _, found = ShardedIndex.open(str(out)).search(vectors[2990:], 1)
    assert list(found[:, 0]) == list(range(2990, 3000))


def test_s3_round_trip(data, tmp_path, s3_server):
    emb, vectors, ids = data
    import fsspec

    so = s3_server["storage_options"]
    fs = fsspec.filesystem("s3", **so)
    remote_emb = f"s3://{s3_server['bucket']}/emb"
    fs.put(str(emb), remote_emb, recursive=True)
    out = f"s3://{s3_server['bucket']}/idx"
    assert main(["index", "--embeddings", remote_emb, "--output", out, "--index-factory", "IVF16,Flat",
                 "--shards", "2", "--storage-options", json.dumps(so), *RUNNER]) == 0
    index = ShardedIndex.open(out, storage_options=so)
    _, found = index.search(vectors[1234], 1)
    assert found[0, 0] == 1234 and index.lookup(found[0])[0]["id"] == ids[1234]


def test_bad_inputs_exit_2(data, tmp_path, capsys):
    emb, vectors, _ = data
    assert build(emb, tmp_path / "bad", "--index-factory", "IVF12,Bogus") == 2
    assert not (tmp_path / "bad").exists()
    empty = tmp_path / "empty"
    write_embed_output(str(empty), vectors[:0], parts=1)
    assert build(empty, tmp_path / "bad2") == 2
    assert build(tmp_path / "nowhere", tmp_path / "bad3") == 2
    assert build(emb, tmp_path / "bad4", "--column", "nope") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("clipbeam index: error: ") for line in err[-4:])
    assert not any((tmp_path / name).exists() for name in ("bad2", "bad3", "bad4"))

    out = tmp_path / "idx"
    assert build(emb, out, "--index-factory", "Flat", "--shards", "2") == 0
    np.save(tmp_path / "q.npy", np.ones((2, DIM + 1), np.float32))
    assert main(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy")]) == 2
    with pytest.raises(IndexInputError):
        ShardedIndex.open(str(out)).search(np.ones(DIM + 1), 3)
    data_bytes = (out / "shard-00001.faiss").read_bytes()
    (out / "shard-00001.faiss").write_bytes(b"\0" * len(data_bytes))
    np.save(tmp_path / "q.npy", np.ones((1, DIM), np.float32))
    assert main(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy")]) == 2
    assert "corrupt" in capsys.readouterr().err
    (out / "shard-00001.faiss").write_bytes(data_bytes[:-100])
    with pytest.raises(IndexInputError, match="corrupt"):
        ShardedIndex.open(str(out))
    (out / "shard-00001.faiss").unlink()
    assert main(["search", "--index", str(out), "--vectors", str(tmp_path / "q.npy")]) == 2
    assert "missing" in capsys.readouterr().err


def test_worker_failure_exits_1_and_a_rerun_resumes(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "idx"
    vectors = clustered(900, DIM, seed=6)
    write_embed_output(str(emb), vectors, parts=3, dtype=np.float32)
    with unreadable_pages(str(emb / "embeddings" / "part-00002.parquet")):
        assert build(emb, out, "--index-factory", "Flat", "--shards", "3") == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert not (out / "index.json").exists()
    finished = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.endswith(".faiss")}
    assert build(emb, out, "--index-factory", "Flat", "--shards", "3") == 0
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # kept, not rebuilt
    index = ShardedIndex.open(str(out))
    assert index.ntotal == 900 and not (out / "_work").exists()
    _, found = index.search(vectors[850:860], 1)
    assert list(found[:, 0]) == list(range(850, 860))


def test_resume_with_other_options_refuses(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "idx"
    write_embed_output(str(emb), clustered(900, DIM, seed=6), parts=3, dtype=np.float32)
    with unreadable_pages(str(emb / "embeddings" / "part-00002.parquet")):
        assert build(emb, out, "--index-factory", "IVF8,Flat", "--shards", "3") == 1  # stopped partway
    capsys.readouterr()
    assert build(emb, out, "--index-factory", "IVF16,Flat", "--shards", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "factory: 'IVF8,Flat' -> 'IVF16,Flat'" in err[0]
    assert build(emb, out, "--index-factory", "IVF16,Flat", "--shards", "3", "--overwrite") == 0
    assert ShardedIndex.open(str(out)).manifest["factory"] == "IVF16,Flat"


def test_build_shards_transform(data, tmp_path):
    """BuildShards and TuneShards alone: train once, build every planned shard with global ids, mark each
    done, then tune on both shards together."""
    emb, vectors, _ = data
    parser = argparse.ArgumentParser()
    index_build.add_arguments(parser)
    args = parser.parse_args(["--embeddings", str(emb), "--output", str(tmp_path / "idx"),
                              "--index-factory", "IVF8,Flat", "--shards", "2"])
    config = dataclasses.replace(index_build.prepare(args).config, ledger=UnitLedger(str(tmp_path / "idx")))
    os.makedirs(tmp_path / "idx")
    with BeamTestPipeline() as pipeline:
        shards = pipeline | BuildShards(config, list(config.shards), [], trained=False)
        assert_that(shards | beam.Map(lambda s: (s.number, s.ntotal, s.id_start, s.id_end)),
                    equal_to([(0, 1500, 0, 1500), (1, 1500, 1500, 3000)]))
        tuned = shards | TuneShards(config)
        assert_that(tuned | beam.Map(lambda t: (t["measured_on_shards"], t["target_reached"],
                                                t["search_params"].startswith("nprobe="))),
                    equal_to([([0, 1], True, True)]), label="Tuned")
    shard = faiss.read_index(str(tmp_path / "idx" / "shard-00001.faiss"))
    assert shard.ntotal == 1500 and faiss.extract_index_ivf(shard).nlist == 8
    assert sorted(UnitLedger(str(tmp_path / "idx")).done()) == ["shard-00000", "shard-00001"]


def test_failed_append_leaves_the_index_searchable_and_a_rerun_finishes_it(tmp_path, capsys):
    emb, out = tmp_path / "emb", tmp_path / "idx"
    vectors = clustered(600, DIM, seed=8)
    write_embed_output(str(emb), vectors, parts=3, dtype=np.float32)
    manifest = json.loads((emb / "manifest.json").read_text())
    grown = dict(manifest, parts=manifest["parts"][:2])
    (emb / "manifest.json").write_text(json.dumps(grown))  # day one: two parts
    assert build(emb, out, "--index-factory", "Flat", "--append") == 0  # no index yet: --append builds one
    day_one = os.stat(out / "index.json")
    (emb / "manifest.json").write_text(json.dumps(manifest))  # day two: a third part
    with unreadable_pages(str(emb / "embeddings" / "part-00002.parquet")):
        assert build(emb, out, "--append") == 1
    assert "rerun the same command to resume" in capsys.readouterr().err
    # the very file of day one: never deleted and written back (which left a moment with no index.json)
    assert (os.stat(out / "index.json").st_ino, os.stat(out / "index.json").st_mtime_ns) == \
        (day_one.st_ino, day_one.st_mtime_ns)
    assert ShardedIndex.open(str(out)).ntotal == 400  # yesterday's index, still complete
    assert build(emb, out, "--append") == 0
    index = ShardedIndex.open(str(out))
    assert index.ntotal == 600 and len(index.manifest["shards"]) == 2
    _, found = index.search(vectors[590:600], 1)
    assert list(found[:, 0]) == list(range(590, 600))


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16"])
def test_in_process_and_beam_build_the_same_index(data, tmp_path, factory):
    """No Beam option: the steps run in this process; --runner DirectRunner: the Beam pipeline. Same index."""
    emb, vectors, _ = data
    common = ["index", "--embeddings", str(emb), "--index-factory", factory, "--shards", "3"]
    assert main([*common, "--output", str(tmp_path / "here")]) == 0
    assert main([*common, "--output", str(tmp_path / "beam"), *RUNNER]) == 0
    here, beam_built = ShardedIndex.open(str(tmp_path / "here")), ShardedIndex.open(str(tmp_path / "beam"))
    for key in ("factory", "ntotal", "search_params"):
        assert here.manifest[key] == beam_built.manifest[key]
    assert here.manifest["train"].get("index_sha256") == beam_built.manifest["train"].get("index_sha256")
    assert "stage_seconds" not in here.manifest["train"]
    assert abs(here.manifest["recall_at_10"] - beam_built.manifest["recall_at_10"]) <= 0.001
    keys = ("id_start", "id_end", "ntotal", "sha256", "ids_sha256")  # byte for byte the same files
    assert [[s[k] for k in keys] for s in here.manifest["shards"]] == \
        [[s[k] for k in keys] for s in beam_built.manifest["shards"]]
    for number in range(3):
        name = f"shard-0000{number}.ids.parquet"
        assert pq.read_table(tmp_path / "here" / name).equals(pq.read_table(tmp_path / "beam" / name))
    queries = vectors[::97]
    np.testing.assert_array_equal(here.search(queries, 10)[1], beam_built.search(queries, 10)[1])


def test_in_process_build_never_imports_beam(data, tmp_path):
    emb, vectors, _ = data
    code = ("import sys; from clipbeam.cli import main; "
            f"assert main(['index', '--embeddings', {str(emb)!r}, '--output', {str(tmp_path / 'idx')!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith('apache_beam'))[:3])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert "stages" in done.stderr and "planning" in done.stderr and "beam" not in done.stderr.split("stages")[-1]


@pytest.mark.parametrize("budget", ["4GB", "64KB"])  # 64KB: the 115KB of vectors are streamed, not kept
def test_in_process_failure_exits_1_and_a_rerun_resumes(tmp_path, capsys, budget):
    emb, out = tmp_path / "emb", tmp_path / "idx"
    vectors = clustered(900, DIM, seed=6)
    write_embed_output(str(emb), vectors, parts=3, dtype=np.float32)
    args = ["index", "--embeddings", str(emb), "--output", str(out), "--index-factory", "Flat", "--shards", "3",
            "--max-index-memory", budget]
    with unreadable_pages(str(emb / "embeddings" / "part-00002.parquet")):
        assert main(args) == 1
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    finished = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out) if n.endswith(".faiss")}
    # the garbled page is in the id column, which both read shard by shard: shards 0 and 1 finish first
    assert "shard-00001.faiss" in finished and not (out / "index.json").exists()
    assert main(args) == 0
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # kept, not rebuilt
    _, found = ShardedIndex.open(str(out)).search(vectors[850:860], 1)
    assert list(found[:, 0]) == list(range(850, 860))


def test_prefetched_keeps_order_raises_in_place_and_stops_its_thread():
    from clipbeam.index.build import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise OSError("page unreadable")

    got = []
    with pytest.raises(OSError, match="page unreadable"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1, 2]
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    stream = prefetched(endless())
    assert next(stream) == 0
    stream.close()  # as _write_ids does when adding fails: the reading thread stops, nothing more is read
    assert len(produced) <= 3 and not any(t.name == "clipbeam-index-read" for t in threading.enumerate())
