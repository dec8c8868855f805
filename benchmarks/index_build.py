"""Build time, peak memory, recall@10 and queries/s: `clipbeam index` (1 and 4 shards) beside faiss used directly.

Writes N x D clustered float32 vectors in the embed output format, then runs,
each in its own process so that peak RSS is its own:
  faiss    read the Parquet parts, train on the same sample size, add, write, tune nprobe itself
  clipbeam `clipbeam index` with 1 and with 4 shards (DirectRunner), same factory
and measures every result in this process on the same held-out queries against
exact search (each query's own id left out), with the search parameters each
build chose. Usage: python benchmarks/index_build.py [--n 200000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbeam.index import ShardedIndex, choose_factory, parse_memory
from clipbeam.index.factory import default_train_sample
from clipbeam.index.topk import drop_self, recall_at_k

K = 10


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 50_000):
        hi = min(n, lo + 50_000)
        x = centres[rng.integers(0, clusters, hi - lo)] + 0.6 * rng.standard_normal((hi - lo, dim)).astype(np.float32)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def write_parts(folder: str, vectors: np.ndarray, parts: int) -> None:
    os.makedirs(os.path.join(folder, "embeddings"), exist_ok=True)
    n, dim = vectors.shape
    entries = []
    for p, (lo, hi) in enumerate(zip(np.linspace(0, n, parts + 1).astype(int)[:-1],
                                     np.linspace(0, n, parts + 1).astype(int)[1:])):
        values = pa.array(vectors[lo:hi].ravel())
        table = pa.table({"id": pa.array([f"{i:08d}" for i in range(lo, hi)]),
                          "source": pa.array([f"bench/{p:05d}.tar"] * (hi - lo)),
                          "caption": pa.nulls(hi - lo, pa.string()),
                          "image_embedding": pa.ListArray.from_arrays(
                              pa.array(np.arange(0, (hi - lo + 1) * dim, dim, dtype=np.int32)), values)})
        path = f"embeddings/part-{p:05d}.parquet"
        pq.write_table(table.replace_schema_metadata({b"clipbeam.dim": str(dim).encode()}),
                       os.path.join(folder, path), row_group_size=10_000)
        entries.append({"path": path, "rows": int(hi - lo), "failures": 0, "source": f"bench/{p:05d}.tar"})
    with open(os.path.join(folder, "manifest.json"), "w") as handle:
        json.dump({"model": "ViT-B-32", "pretrained": "none", "seed": 0, "dim": dim, "dtype": "float32",
                   "parts": entries, "clipbeam_version": "bench"}, handle)


def direct_faiss(emb: str, out: str, factory: str, train: int, target: float, seed: int) -> None:
    """What a user writes with faiss alone: load everything, train, add, write, tune nprobe on held-out queries."""
    parts = json.load(open(os.path.join(emb, "manifest.json")))["parts"]
    table = pa.concat_tables(pq.read_table(os.path.join(emb, p["path"]), columns=["image_embedding"]) for p in parts)
    column = table.column("image_embedding").combine_chunks()
    dim = len(column[0])
    x = column.flatten().to_numpy().reshape(-1, dim).astype(np.float32)
    del table, column
    n = len(x)
    rng = np.random.default_rng(seed)
    train = min(train, n - min(1000, n // 10))
    chosen = rng.choice(n, size=train + min(1000, n // 10), replace=False)
    queries_ids = np.sort(chosen[: min(1000, n // 10)])
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.sort(chosen[len(queries_ids):])])
    index.add(x)
    faiss.write_index(index, out)
    queries = x[queries_ids]
    _, truth = faiss.knn(queries, x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    truth = drop_self(truth, queries_ids, K)
    ivf = faiss.extract_index_ivf(index)
    params, nprobe, curve = "", 1, []
    while nprobe <= ivf.nlist:
        ivf.nprobe = nprobe
        _, found = index.search(queries, K + 1)
        curve.append(recall_at_k(drop_self(found, queries_ids, K), truth, K))
        params = f"nprobe={nprobe}"
        if curve[-1] >= target or (len(curve) >= 3 and curve[-1] - curve[-3] < 0.002):
            break
        nprobe *= 2
    json.dump({"params": params}, open(out + ".json", "w"))


def run_measured(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def measure(search, set_params, x: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    set_params()
    queries = x[query_ids]
    search(queries[:10])
    start = time.perf_counter()
    _, found = search(queries)
    seconds = time.perf_counter() - start
    return recall_at_k(drop_self(found, query_ids, K), truth, K), len(queries) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--max-index-memory", default="32MB", help="budget; picks the factory (default IVF-PQ)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "faiss":
        direct_faiss(**json.loads(args.args))
        return
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    budget = parse_memory(args.max_index_memory)
    factory = choose_factory(args.n, args.dim, budget).factory
    train = default_train_sample(factory, args.n)
    with tempfile.TemporaryDirectory(prefix="clipbeam-bench-") as tmp:
        x = clustered(args.n, args.dim, args.clusters)
        emb = os.path.join(tmp, "emb")
        write_parts(emb, x, parts=20)
        eval_ids = np.sort(np.random.default_rng(123).choice(args.n, 1000, replace=False))
        _, truth = faiss.knn(x[eval_ids], x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
        truth = drop_self(truth, eval_ids, K)
        rows = []
        out = os.path.join(tmp, "direct.faiss")
        seconds, rss = run_measured([sys.executable, __file__, "--worker", "faiss", "--args", json.dumps(
            {"emb": emb, "out": out, "factory": factory, "train": train, "target": args.target_recall, "seed": 0})])
        index = faiss.read_index(out)
        params = json.load(open(out + ".json"))["params"]
        recall, qps = measure(lambda q: index.search(q, K + 1),
                              lambda: faiss.ParameterSpace().set_index_parameters(index, params), x, eval_ids, truth)
        rows.append(("faiss direct", seconds, rss, params, recall, qps))
        for shards in (1, 4):
            out = os.path.join(tmp, f"idx{shards}")
            seconds, rss = run_measured([sys.executable, "-m", "clipbeam", "index", "--embeddings", emb, "--output", out,
                                         "--index-factory", factory, "--shards", str(shards),
                                         "--max-index-memory", args.max_index_memory, "--train-sample", str(train),
                                         "--target-recall", str(args.target_recall)])
            sharded = ShardedIndex.open(out)
            recall, qps = measure(lambda q: sharded.search(q, K + 1), lambda: None, x, eval_ids, truth)
            rows.append((f"clipbeam {shards} shard{'s' if shards > 1 else ''}", seconds, rss,
                         sharded.search_params, recall, qps))
    base = rows[0][1]
    print(f"{args.n} x {args.dim} clustered float32, factory {factory}, train sample {train}, budget "
          f"{args.max_index_memory}, target recall@10 {args.target_recall}, {os.cpu_count()} cores")
    print(f"{'build':<18}{'seconds':>9}{'x faiss':>9}{'peak RSS MB':>13}  {'params':<12}{'recall@10':>10}{'queries/s':>11}")
    for name, seconds, rss, params, recall, qps in rows:
        print(f"{name:<18}{seconds:>9.1f}{seconds / base:>9.2f}{rss / 2**20:>13.0f}  {params:<12}{recall:>10.4f}"
              f"{qps:>11.0f}")


if __name__ == "__main__":
    main()
