"""Build time, peak memory, recall@10 and queries/s: `clipbeam index` beside plain faiss, whole process each.

Writes N x D clustered vectors (tests/synthetic_embeddings.py's generator) as
clipbeam embed writes them (float16 lists, zstd Parquet, 4 parts), and the same
vectors as one float32 .npy, then runs, each in its own process so that wall
time and peak RSS are its own:
  faiss     what a user writes with faiss alone: load the .npy, train on a random
            sample of the size clipbeam's rule gives (65,536 for IVF1024), add,
            write the index, tune nprobe on 1000 held-out queries against exact search
  clipbeam  `clipbeam index --shards 4` with its defaults (--index-factory auto), so
            the factory is clipbeam's own choice; plain faiss uses the same one
at the default 4GB budget for every --n, and at a 32MB budget (IVF-PQ, where
PQ caps recall) for the first --n with 1 and 4 shards. Every result is then
measured in this process on the same 1000 held-out queries against exact search
(each query's own id left out), with the search parameters each build chose.
Usage: python benchmarks/index_build.py [--n 200000 1000000] [--dim 512] [--small-budget 32MB]
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

# The plain-faiss worker runs this file too: only faiss and numpy are imported at the top, so that its
# whole-process time holds what a user's script would import, not clipbeam's or pyarrow's start-up.

K = 10
DEFAULT_BUDGET = "4GB"


def write_parts(folder: str, vectors: np.ndarray, parts: int, dtype: str) -> None:
    """The embed output layout: manifest.json + embeddings/part-NNNNN.parquet, written by embed's own writer."""
    import pyarrow as pa

    from clipbeam.layout.embeddings.write import write_table

    os.makedirs(os.path.join(folder, "embeddings"), exist_ok=True)
    n, dim = vectors.shape
    entries = []
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        values = pa.array(vectors[lo:hi].astype(dtype).ravel())
        table = pa.table({"id": pa.array([f"{i:08d}" for i in range(lo, hi)]),
                          "source": pa.array([f"bench/{p:05d}.tar"] * (hi - lo)),
                          "caption": pa.nulls(hi - lo, pa.string()),
                          "image_embedding": pa.ListArray.from_arrays(
                              pa.array(np.arange(0, (hi - lo + 1) * dim, dim, dtype=np.int32)), values)})
        path = f"embeddings/part-{p:05d}.parquet"
        write_table(table.replace_schema_metadata({b"clipbeam.dim": str(dim).encode()}),  # embed's own writer
                    os.path.join(folder, path), None)
        entries.append({"path": path, "rows": int(hi - lo), "failures": 0, "source": f"bench/{p:05d}.tar"})
    with open(os.path.join(folder, "manifest.json"), "w") as handle:
        json.dump({"model": "ViT-B-32", "pretrained": "none", "seed": 0, "dim": dim, "dtype": dtype,
                   "parts": entries, "clipbeam_version": "bench"}, handle)


def recall_without_self(found: np.ndarray, truth: np.ndarray, query_ids: np.ndarray) -> float:
    """recall@K with each query's own id left out of both lists (queries are database vectors)."""
    hits = total = 0
    for got, want, own in zip(found, truth, query_ids, strict=True):
        got, want = got[(got != own) & (got >= 0)][:K], want[(want != own) & (want >= 0)][:K]
        hits += len(np.intersect1d(got, want))
        total += len(want)
    return hits / max(total, 1)


def parameter_ladder(index: faiss.Index) -> list[str]:
    """nprobe for inverted lists, efSearch for graphs, cheapest first: what a user tries by hand."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return [f"nprobe={1 << i}" for i in range(int(np.log2(ivf.nlist)) + 1)]
    if "HNSW" in type(faiss.downcast_index(index)).__name__:
        return [f"efSearch={1 << i}" for i in range(4, 13)]
    return [""]


def plain_faiss(npy: str, out: str, factory: str, train: int, target: float, seed: int) -> None:
    """What a user writes with faiss alone: load everything, train, add, write, tune on held-out queries."""
    x = np.load(npy)
    n, dim = x.shape
    nq = min(1000, n // 10)
    chosen = np.random.default_rng(seed).choice(n, size=min(train, n - nq) + nq, replace=False)
    query_ids = np.sort(chosen[:nq])
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.sort(chosen[nq:])])
    index.add(x)
    faiss.write_index(index, out)
    queries = x[query_ids]
    _, truth = faiss.knn(queries, x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
    curve = []
    for params in parameter_ladder(index):
        faiss.ParameterSpace().set_index_parameters(index, params)
        _, found = index.search(queries, K + 1)
        curve.append(recall_without_self(found, truth, query_ids))
        if curve[-1] >= target or (len(curve) >= 3 and curve[-1] - curve[-3] < 0.002):
            break
    with open(out + ".json", "w") as handle:
        json.dump({"params": params}, handle)


LAUNCHER = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    command, log = json.loads(line)
    start = time.monotonic()
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps([time.monotonic() - start, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)]), flush=True)
"""


class Launcher:
    """Runs each measured command from a small process started before this one holds the vectors.

    Linux starts a forked child's peak RSS (ru_maxrss) at its parent's size, and keeps it across exec,
    so a child forked from this process would report at least the vectors this process holds. The
    children of the launcher start from its size instead (an interpreter with numpy and faiss loaded).
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, command: list[str], log: str) -> tuple[float, int]:
        """(wall seconds, peak RSS bytes) of one child process; its stderr goes to `log`."""
        self.proc.stdin.write(json.dumps([command, log]) + "\n")
        self.proc.stdin.flush()
        seconds, rss, code = json.loads(self.proc.stdout.readline())
        if code != 0:
            with open(log) as handle:
                raise SystemExit(f"{' '.join(command)} failed:\n{handle.read()[-3000:]}")
        return seconds, rss


def measure(index, x: np.ndarray, query_ids: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """recall@10 and queries/s of a faiss index or a ShardedIndex with the parameters its build chose."""
    queries = x[query_ids]
    index.search(queries[:10], K + 1)
    start = time.perf_counter()
    _, found = index.search(queries, K + 1)
    seconds = time.perf_counter() - start
    return recall_without_self(found, truth, query_ids), len(queries) / seconds


def run_case(launcher: Launcher, tmp: str, x: np.ndarray, eval_ids: np.ndarray, truth: np.ndarray, budget: str,
             shards: list[int], args: argparse.Namespace) -> None:
    """Plain faiss and clipbeam at one budget; prints one table."""
    from clipbeam.index import ShardedIndex, choose_factory, parse_memory
    from clipbeam.index.factory import default_train_sample

    n, dim = x.shape
    factory = choose_factory(n, dim, parse_memory(budget)).factory
    train = default_train_sample(factory, n)
    out = os.path.join(tmp, f"plain-{budget}.faiss")
    seconds, rss = launcher.run([sys.executable, __file__, "--worker", json.dumps(
        {"npy": os.path.join(tmp, "x.npy"), "out": out, "factory": factory, "train": train,
         "target": args.target_recall, "seed": 0})], os.path.join(tmp, "faiss.log"))
    index = faiss.read_index(out)
    params = json.load(open(out + ".json"))["params"]
    faiss.ParameterSpace().set_index_parameters(index, params)
    rows = [("faiss (.npy)", seconds, rss, params, *measure(index, x, eval_ids, truth))]
    for count in shards:
        out = os.path.join(tmp, f"idx-{budget}-{count}")
        command = [sys.executable, "-m", "clipbeam", "index", "--embeddings", os.path.join(tmp, "emb"),
                   "--output", out, "--shards", str(count), "--target-recall", str(args.target_recall)]
        if budget != DEFAULT_BUDGET:
            command += ["--max-index-memory", budget]
        seconds, rss = launcher.run(command, os.path.join(tmp, "clipbeam.log"))
        sharded = ShardedIndex.open(out)
        assert sharded.manifest["factory"] == factory, (sharded.manifest["factory"], factory)
        rows.append((f"clipbeam {count} shard{'s' if count > 1 else ''}", seconds, rss, sharded.search_params,
                     *measure(sharded, x, eval_ids, truth)))
    print(f"\n{n} x {dim} clustered ({args.clusters} clusters), {args.dtype} Parquet in {args.parts} parts"
          ", "
          f"budget {budget}: {factory}, train sample {train}, target recall@10 {args.target_recall}, "
          f"{os.cpu_count()} cores")
    print(f"{'build':<18}{'seconds':>9}{'x faiss':>9}{'peak RSS MB':>13}  {'params':<12}{'recall@10':>10}"
          f"{'queries/s':>11}")
    for name, seconds, rss, params, recall, qps in rows:
        print(f"{name:<18}{seconds:>9.1f}{seconds / rows[0][1]:>9.2f}{rss / 2**20:>13.0f}  {params:<12}"
              f"{recall:>10.4f}{qps:>11.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored type, as embed's")
    parser.add_argument("--small-budget", default="32MB", help="budget of the IVF-PQ case at the first --n ('' skips)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plain_faiss(**json.loads(args.worker))
        return
    launcher = Launcher()  # before this process holds any vectors
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from synthetic_embeddings import clustered

    for number, n in enumerate(args.n):
        with tempfile.TemporaryDirectory(prefix="clipbeam-bench-") as tmp:
            x = clustered(n, args.dim, clusters=args.clusters, seed=0)
            x = x.astype(args.dtype).astype(np.float32)  # what the index reads back from the Parquet parts
            write_parts(os.path.join(tmp, "emb"), x, args.parts, args.dtype)
            np.save(os.path.join(tmp, "x.npy"), x)
            eval_ids = np.sort(np.random.default_rng(123).choice(n, 1000, replace=False))
            _, truth = faiss.knn(x[eval_ids], x, K + 1, metric=faiss.METRIC_INNER_PRODUCT)
            run_case(launcher, tmp, x, eval_ids, truth, DEFAULT_BUDGET, [4], args)
            if number == 0 and args.small_budget:
                run_case(launcher, tmp, x, eval_ids, truth, args.small_budget, [1, 4], args)


if __name__ == "__main__":
    main()
