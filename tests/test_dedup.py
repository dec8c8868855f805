"""`clipbeam dedup`: the groups are the connected components of exact all-pairs search, whatever the parts,
clusters and workers; the keep rules are deterministic; the lifecycle resumes, refuses and redoes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dedup_helpers import exact_groups, groups_at, manifest, pair_recall, planted, read_groups
from synthetic_embeddings import unreadable_pages, write_embed_output

from clipbeam.cli import main
from clipbeam.dedup.components import Forests, star_forest

THRESHOLDS = (0.95, 0.9)


def dedup(emb, out, *extra: str) -> int:
    return main(["dedup", "--embeddings", str(emb), "--output", str(out), "--runner", "DirectRunner", *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """520 clustered 32-d vectors + 130 planted near-duplicates, in 3 embeddings parts."""
    root = tmp_path_factory.mktemp("dedup")
    vectors = planted(520, 32, 130)
    ids = write_embed_output(str(root / "emb"), vectors, parts=3, dtype=np.float32)
    return root, vectors, ids


def test_groups_equal_the_components_of_exact_all_pairs_search(corpus, tmp_path):
    root, vectors, ids = corpus
    out = tmp_path / "dd"
    assert dedup(root / "emb", out, "--threshold", "0.95", "--threshold", "0.9") == 0
    rows = read_groups(str(out))
    for t in THRESHOLDS:
        truth = exact_groups(vectors, ids, t)
        assert len(truth) > 20  # the planted copies make groups, some across parts
        assert groups_at(rows, t) == truth
    info = manifest(str(out))
    assert info["format"] == "clipbeam.dedup" and info["thresholds"] == [0.95, 0.9]
    for entry in info["per_threshold"]:
        truth = exact_groups(vectors, ids, entry["threshold"])
        members = sum(len(g) for g in truth)
        assert (entry["samples"], entry["groups"], entry["removed"]) == (650, len(truth), members - len(truth))
        assert entry["removed_percent"] == round(100 * (members - len(truth)) / 650, 3)
    assert sum(info["nn_histogram"]["counts"]) == 650
    assert not (out / "_work").exists()


def test_across_many_clusters_probing_buys_the_recall_back(corpus, tmp_path):
    """12 k-means clusters: probing every cluster is exact; the default --probe 2 is measured and reported."""
    root, vectors, ids = corpus
    truth = exact_groups(vectors, ids, 0.9)
    assert dedup(root / "emb", tmp_path / "all", "--threshold", "0.9", "--clusters", "12", "--probe", "12",
                 "--block-rows", "16") == 0
    assert groups_at(read_groups(str(tmp_path / "all")), 0.9) == truth
    recalls = {}
    for probe in (1, 2):
        out = tmp_path / f"p{probe}"
        assert dedup(root / "emb", out, "--threshold", "0.9", "--clusters", "12", "--probe", str(probe)) == 0
        recalls[probe] = pair_recall(groups_at(read_groups(str(out)), 0.9), truth)
    print(f"pair recall at cos >= 0.9 with 12 clusters: probe 1 {recalls[1]:.4f}, probe 2 {recalls[2]:.4f}")
    assert recalls[2] >= recalls[1] and recalls[2] >= 0.95


def test_a_chain_across_parts_and_clusters_is_one_group(tmp_path):
    """a~b and b~c at 0.96, a and c at ~0.85: one group at 0.95 (components, not cliques), three parts apart."""
    rng = np.random.default_rng(3)
    base = planted(300, 16, 0, seed=3)
    a = base[0]
    ortho = rng.standard_normal(16).astype(np.float32)
    ortho -= ortho @ a * a
    ortho /= np.linalg.norm(ortho)
    chain = [np.cos(t) * a + np.sin(t) * ortho for t in (0.0, 0.28, 0.56)]  # cos(0.28) = 0.961
    rows = list(base[1:])
    rows.insert(0, chain[0])  # a first, b mid-corpus, c last: three parts apart
    rows.insert(150, chain[1])
    vectors = np.stack([*rows, chain[2]]).astype(np.float32)
    ids = write_embed_output(str(tmp_path / "emb"), vectors, parts=3, dtype=np.float32)
    assert dedup(tmp_path / "emb", tmp_path / "dd", "--clusters", "8", "--probe", "8", "--block-rows", "8",
                 "--parts", "2") == 0
    rows = read_groups(str(tmp_path / "dd"))
    truth = exact_groups(vectors, ids, 0.95)
    assert groups_at(rows, 0.95) == truth
    chained = next(g for g in truth if ids[0] in g)
    assert {ids[0], ids[150], ids[-1]} <= chained
    far = next(r for r in rows if r["id"] == ids[-1])
    assert far["kept_id"] == ids[0] and far["similarity_to_kept"] < 0.9


def test_star_forests_merge_in_any_order_to_the_same_components():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 400, 300), rng.integers(0, 400, 300)
    nodes, roots = star_forest(a, b)
    whole = dict(zip(nodes.tolist(), roots.tolist(), strict=True))
    for seed in range(3):
        order = np.random.default_rng(seed).permutation(300)
        pieces = [Forests((0.9,)).add({0.9: star_forest(a[order[i:i + 37]], b[order[i:i + 37]])})
                  for i in range(0, 300, 37)]
        merged = pieces[0]
        for piece in pieces[1:]:
            merged = piece.merge(merged) if seed % 2 else merged.merge(piece)
        n2, r2 = merged.reduce()[0.9]
        assert dict(zip(n2.tolist(), r2.tolist(), strict=True)) == whole
    assert all(roots[i] == min(n for n, r in whole.items() if r == roots[i]) for i in range(len(roots)))


def _keep_corpus(root, captions, widths):
    vectors = np.tile(planted(1, 16, 0, seed=9), (len(captions), 1))
    ids = write_embed_output(str(root), vectors, parts=2, dtype=np.float32, captions=captions)
    for path in sorted((root / "embeddings").iterdir()):
        table = pq.read_table(path)
        lo = int(table.column("id")[0].as_py().split("-")[1])
        width = pa.array(np.array(widths[lo:lo + table.num_rows], np.int32))
        pq.write_table(table.set_column(table.schema.get_field_index("width"), "width", width), path)
    return ids


def test_keep_rules_and_ties_by_id_are_deterministic(tmp_path):
    captions = ["short", "a much longer caption", "also twenty-one chars", None, "x"]
    ids = _keep_corpus(tmp_path / "emb", captions, [64, 200, 64, 200, 10])
    kept = {}
    for rule in ("first", "longest-caption", "largest-image"):
        for run in range(2):
            out = tmp_path / f"{rule}"
            assert dedup(tmp_path / "emb", out, "--keep", rule, *(["--overwrite"] if run else [])) == 0
            rows = read_groups(str(out))
            assert len(rows) == 5 and len({r["kept_id"] for r in rows}) == 1 and sum(r["kept"] for r in rows) == 1
            assert kept.setdefault(rule, rows) == rows
    assert kept["first"][0]["kept_id"] == ids[0]
    assert kept["longest-caption"][0]["kept_id"] == ids[1]  # 21 characters both: the smaller id
    assert kept["largest-image"][0]["kept_id"] == ids[1]    # 200 x 48 both: the smaller id
    assert {r["kind"] for r in kept["first"]} == {"near"}   # every sha256 differs: near, not exact


def test_exact_copies_by_hash_form_exact_groups(tmp_path):
    vectors = planted(60, 16, 0, seed=4)
    write_embed_output(str(tmp_path / "emb"), vectors, parts=2, dtype=np.float32)
    for path in sorted((tmp_path / "emb" / "embeddings").iterdir()):  # rows 3, 33 and 50 share their bytes
        table = pq.read_table(path)
        sha = [("f" * 64 if int(i.split("-")[1]) in (3, 33, 50) else s)
               for i, s in zip(table.column("id").to_pylist(), table.column("sha256").to_pylist(), strict=True)]
        pq.write_table(table.set_column(table.schema.get_field_index("sha256"), "sha256", pa.array(sha)), path)
    assert dedup(tmp_path / "emb", tmp_path / "dd", "--threshold", "0.999") == 0
    rows = read_groups(str(tmp_path / "dd"))
    assert {r["id"].split("-")[1] for r in rows} == {"000003", "000033", "000050"}
    assert {r["kind"] for r in rows} == {"exact"} and manifest(str(tmp_path / "dd"))["per_threshold"][0][
        "exact_groups"] == 1


def test_resume_after_a_failed_run_and_refusals(corpus, tmp_path, capsys):
    root, vectors, ids = corpus
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    out = tmp_path / "dd"
    with unreadable_pages(str(emb / "embeddings" / "part-00001.parquet")):
        assert dedup(emb, out, "--clusters", "4") == 1
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (out / "_work" / "clusters.npz").exists() and not (out / "manifest.json").exists()
    assert dedup(emb, out, "--clusters", "4") == 0
    assert groups_at(read_groups(str(out)), 0.95) == exact_groups(vectors, ids, 0.95)
    capsys.readouterr()
    assert dedup(emb, out, "--clusters", "4", "--threshold", "0.9") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "thresholds" in err and "--overwrite" in err
    write_embed_output(str(emb), np.concatenate([vectors, vectors[:40]]), parts=4, dtype=np.float32)  # it grew
    assert dedup(emb, out, "--clusters", "4") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inputs" in err and "4 parts" in err
    assert main(["index", "--embeddings", str(emb), "--output", str(tmp_path / "idx"), "--exclude", str(out)]) == 2
    assert "other embeddings" in capsys.readouterr().err
    assert dedup(emb, out, "--clusters", "4", "--overwrite") == 0
    assert len(groups_at(read_groups(str(out)), 0.95)) >= 40  # every copied vector is now an exact-vector pair


def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    root, vectors, ids = corpus
    os.makedirs(tmp_path / "plain")
    pq.write_table(pa.table({"id": ["a", "b"], "caption": ["x", "y"]}), tmp_path / "plain" / "rows.parquet")
    assert dedup(tmp_path / "plain", tmp_path / "o1") == 2
    assert "image_embedding" in capsys.readouterr().err
    for bad in ("0", "1.5", "-0.2"):
        assert dedup(root / "emb", tmp_path / "o2", "--threshold", bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "(0, 1]" in err
    write_embed_output(str(tmp_path / "other"), vectors[:300], parts=2, dtype=np.float32)
    assert main(["index", "--embeddings", str(tmp_path / "other"), "--output", str(tmp_path / "idx"),
                 "--index-factory", "IVF4,Flat"]) == 0
    capsys.readouterr()
    assert dedup(root / "emb", tmp_path / "o3", "--index", str(tmp_path / "idx")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other embeddings" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_index_quantizer_is_reused_and_index_and_export_exclude_the_removed(corpus, tmp_path):
    root, vectors, ids = corpus
    idx = tmp_path / "idx"
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(idx), "--index-factory",
                 "IVF8,Flat"]) == 0
    out = tmp_path / "dd"
    assert dedup(root / "emb", out, "--index", str(idx), "--probe", "8", "--threshold", "0.95",
                 "--threshold", "0.9") == 0
    info = manifest(str(out))
    assert info["clusters_used"] == 8 and info["index"]["url"] == str(idx)
    rows = read_groups(str(out))
    assert groups_at(rows, 0.9) == exact_groups(vectors, ids, 0.9)
    removed = {r["id"] for r in rows if abs(r["threshold"] - 0.95) < 1e-6 and not r["kept"]}
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(tmp_path / "clean"),
                 "--exclude", str(out), "--threshold", "0.95"]) == 0
    shard_ids = pq.read_table(tmp_path / "clean" / "shard-00000.ids.parquet").column("id").to_pylist()
    assert len(shard_ids) == 650 - len(removed) and not removed & set(shard_ids)
    assert json.loads((tmp_path / "clean" / "index.json").read_text())["ntotal"] == 650 - len(removed)
    assert main(["export", "--embeddings", str(root / "emb"), "--output", str(tmp_path / "cr"),
                 "--exclude", str(out), "--threshold", "0.95"]) == 0
    meta = pq.read_table(tmp_path / "cr" / "metadata").column("id").to_pylist()
    npy = sum(len(np.load(tmp_path / "cr" / "img_emb" / n)) for n in os.listdir(tmp_path / "cr" / "img_emb"))
    assert len(meta) == npy == 650 - len(removed) and not removed & set(meta)


def test_a_rerun_reuses_the_links_of_the_units_that_finished(corpus, tmp_path, monkeypatch):
    """The run dies while writing the groups (after every unit's links were cached): the rerun computes no links."""
    import clipbeam.transforms.dedup_job as job

    root, vectors, ids = corpus
    out = tmp_path / "dd"

    def disk_full(item, config):
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(job, "write_part", disk_full)
        assert dedup(root / "emb", out, "--clusters", "4", "--threshold", "0.9") == 1
    assert os.listdir(out / "_work" / "links") and not (out / "manifest.json").exists()
    calls = []
    real = job.block_links
    monkeypatch.setattr(job, "block_links", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert dedup(root / "emb", out, "--clusters", "4", "--threshold", "0.9") == 0
    assert calls == []
    assert groups_at(read_groups(str(out)), 0.9) == exact_groups(vectors, ids, 0.9)
    before = (out / "manifest.json").read_text()
    assert dedup(root / "emb", out, "--clusters", "4", "--threshold", "0.9") == 0  # done: nothing to do
    assert (out / "manifest.json").read_text() == before and calls == []


def test_dedup_to_s3_with_its_gallery_and_index_exclude_from_there(corpus, tmp_path, s3_server):
    import s3fs

    root, vectors, ids = corpus
    options = json.dumps(s3_server["storage_options"])
    out = f"s3://{s3_server['bucket']}/dedup"
    assert dedup(root / "emb", out, "--storage-options", options) == 0
    fs = s3fs.S3FileSystem(**s3_server["storage_options"])
    info = json.loads(fs.cat(f"{out}/manifest.json"))
    assert fs.exists(f"{out}/gallery/index.html") and "gallery/images/histogram.png" in info["gallery_files"]
    rows = []
    for part in info["parts"]:
        with fs.open(f"{out}/{part['path']}") as handle:
            rows += pq.read_table(handle).to_pylist()
    assert groups_at(rows, 0.95) == exact_groups(vectors, ids, 0.95)
    assert main(["index", "--embeddings", str(root / "emb"), "--output", str(tmp_path / "idx"), "--exclude", out,
                 "--storage-options", options]) == 0
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["ntotal"] == 650 - info["per_threshold"][0][
        "removed"]


def test_two_worker_processes_give_the_exact_components(corpus, tmp_path):
    """Parts, units and partial components spread over two processes (Beam merges the forests)."""
    root, vectors, ids = corpus
    out = tmp_path / "dd"
    assert dedup(root / "emb", out, "--threshold", "0.95", "--threshold", "0.9", "--clusters", "6", "--probe", "6",
                 "--block-rows", "32", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing") == 0
    rows = read_groups(str(out))
    for t in THRESHOLDS:
        assert groups_at(rows, t) == exact_groups(vectors, ids, t)


def test_routing_meets_every_pair_once_and_bounds_the_units():
    """Pure planning: members of one cluster meet once; a prober meets every member of the cluster it probes
    once; a unit holds at most two blocks, or one block and one share of the probers."""
    from collections import Counter

    from clipbeam.dedup.clusters import PROBER, QUERY, TARGET, route

    rng = np.random.default_rng(0)
    n = 900
    gids, nearest = np.arange(n), np.stack([rng.integers(0, 5, n), rng.integers(0, 5, n)], axis=1)
    blocks = np.array([1, 3, 2, 1, 4])
    units: dict[tuple, dict[int, list[int]]] = {}
    for routed in route(gids, nearest, blocks):
        units.setdefault(routed.key, {QUERY: [], TARGET: [], PROBER: []})[routed.side] += gids[routed.rows].tolist()
    met = Counter()
    for (c, a, b, share), sides in units.items():
        members, others, probers = sides[QUERY], sides[TARGET], sides[PROBER]
        assert probers == [] or a == b
        if share == 0:
            met.update((min(i, j), max(i, j)) for k, i in enumerate(members)
                       for j in (members[k + 1:] if a == b else others))
        met.update((i, -1 - j) for i in probers for j in members)
        size, probing = np.sum(nearest[:, 0] == c), np.sum((nearest[:, 1] == c) & (nearest[:, 0] != c))
        assert len(members) + len(others) <= 2.6 * size / blocks[c] + 20
        assert len(probers) <= 1.6 * probing / blocks[c] + 20
    c0 = nearest[:, 0]
    for i in range(n):
        same = np.flatnonzero(c0 == c0[i])
        assert all(met[(i, j)] == 1 for j in same if j > i)
        if nearest[i, 1] != c0[i]:
            assert all(met[(i, -1 - j)] == 1 for j in np.flatnonzero(c0 == nearest[i, 1]))
