"""Build time, peak memory, recall@10 and queries/s: `clipbeam index` beside plain faiss, whole process each.

Writes N x D clustered vectors (tests/synthetic_embeddings.py's generator) as
clipbeam embed writes them (float16 lists, zstd Parquet, 4 parts), and the same
vectors as one float32 .npy, then runs, each in its own process so that wall
time and peak RSS are its own, --runs times each, the two sides alternating
(faiss, clipbeam, faiss, clipbeam, ...) so that drift shows in the raw runs:
  faiss     what a user writes with faiss alone: load the .npy, train on a random
            sample of the size clipbeam's rule gives (65,536 for IVF1024), add,
            write the index, then the fastest exact ground truth a user has for
            1000 held-out queries (--truth blas: blocked BLAS top-k, as clipbeam's;
            --truth flat: IndexFlat.search) and nprobe doubled from 1 until the
            same recall target (or a plateau), as clipbeam tunes
  clipbeam  `clipbeam index --shards 4` with its defaults (--index-factory auto), so
            the factory is clipbeam's own choice; plain faiss uses the same one
at the default 4GB budget for every --n, and at a 32MB budget (IVF-PQ, where
PQ caps recall) for the first --n with 1 and 4 shards. Every result is then
measured in this process on the same 1000 held-out queries against exact search
(each query's own id left out), with the search parameters each build chose.
Printed per case: every raw run, the medians and their ratio, clipbeam's stage
breakdown (median seconds per stage, start-up = process wall - the command's
own seconds) beside plain faiss' own stages, and batched search: 4 shards vs
one faiss index with the same parameters, queries/s at --batch (256).
Usage: python benchmarks/index_build.py [--n 200000 1000000] [--dim 512] [--runs 3] [--small-budget 32MB]
       python benchmarks/index_build.py --quick    # a smoke test: 20,000 x 64, IVF256,Flat, 1 run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def exact_top(x: np.ndarray, queries: np.ndarray, k: int, block: int = 16_384) -> np.ndarray:
    """Exact inner-product top-k ids by blocked BLAS: one product per block of rows, a partial sort, a merge.

    What a user writes with numpy in ten lines; as fast as clipbeam's own ground truth (ExactTopK).
    """
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(x), block):
        scores = queries @ x[start:start + block].T
        top = np.argpartition(-scores, min(k, scores.shape[1]) - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


def plain_faiss(npy: str, out: str, factory: str, train: int, target: float, seed: int, truth: str) -> None:
    """What a user writes with faiss alone: load everything, train, add, write, tune on held-out queries."""
    stages, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name] = stages.get(name, 0.0) + now - clock
        clock = now

    x = np.load(npy)
    n, dim = x.shape
    nq = min(1000, n // 10)
    chosen = np.random.default_rng(seed).choice(n, size=min(train, n - nq) + nq, replace=False)
    query_ids = np.sort(chosen[:nq])
    lap("reading")
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[np.sort(chosen[nq:])])
    lap("training")
    index.add(x)
    lap("adding")
    faiss.write_index(index, out)
    lap("writing")
    queries = x[query_ids]
    if truth == "flat":
        flat = faiss.IndexFlatIP(dim)
        flat.add(x)
        _, truth_ids = flat.search(queries, K + 1)
        del flat
    else:
        truth_ids = exact_top(x, queries, K + 1)
    lap("recall")
    curve = []
    for params in parameter_ladder(index):
        faiss.ParameterSpace().set_index_parameters(index, params)
        _, found = index.search(queries, K + 1)
        curve.append(recall_without_self(found, truth_ids, query_ids))
        if curve[-1] >= target or (len(curve) >= 3 and curve[-1] - curve[-3] < 0.002):
            break
    lap("tuning")
    with open(out + ".json", "w") as handle:
        json.dump({"params": params, "stages": stages}, handle)


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


STAGE_ORDER = ("start-up", "planning", "reading", "sampling", "training", "adding", "recall", "tuning", "writing",
               "beam", "other")


def clipbeam_stages(log: str, wall: float) -> dict[str, float]:
    """The stage seconds `clipbeam index` printed in its summary, plus start-up (wall - its own seconds)."""
    stages: dict[str, float] = {}
    with open(log) as handle:
        for line in handle:
            key, _, value = line.strip().partition(" ")
            if key == "seconds":
                stages["start-up"] = wall - float(value)
            elif key == "stages":
                for item in value.strip().split(", "):
                    name, seconds = item.rsplit(" ", 1)
                    stages[name] = float(seconds)
    return stages


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.median([r.get(name, 0.0) for r in runs])) for name in STAGE_ORDER
            if any(name in r for r in runs)}


def build_plain(launcher: Launcher, tmp: str, budget: str, factory: str, train: int,
                args: argparse.Namespace) -> tuple[float, int, str, dict]:
    out = os.path.join(tmp, f"plain-{budget}.faiss")
    seconds, rss = launcher.run([sys.executable, __file__, "--worker", json.dumps(
        {"npy": os.path.join(tmp, "x.npy"), "out": out, "factory": factory, "train": train,
         "target": args.target_recall, "seed": 0, "truth": args.truth})], os.path.join(tmp, "faiss.log"))
    result = json.load(open(out + ".json"))
    stages = {**result["stages"], "start-up": seconds - sum(result["stages"].values())}  # imports, exit
    return seconds, rss, result["params"], stages


def build_clipbeam(launcher: Launcher, tmp: str, budget: str, count: int,
                   args: argparse.Namespace) -> tuple[float, int, dict]:
    out = os.path.join(tmp, f"idx-{budget}-{count}")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "clipbeam", "index", "--embeddings", os.path.join(tmp, "emb"),
               "--output", out, "--shards", str(count), "--target-recall", str(args.target_recall)]
    if budget != DEFAULT_BUDGET:
        command += ["--max-index-memory", budget]
    if args.factory != "auto":
        command += ["--index-factory", args.factory]
    log = os.path.join(tmp, "clipbeam.log")
    seconds, rss = launcher.run(command + args.clipbeam_args, log)
    return seconds, rss, clipbeam_stages(log, seconds)


def run_case(launcher: Launcher, tmp: str, x: np.ndarray, eval_ids: np.ndarray, truth: np.ndarray, budget: str,
             shards: list[int], args: argparse.Namespace) -> None:
    """Plain faiss and clipbeam at one budget, --runs times in alternation; prints the tables."""
    from clipbeam.index import ShardedIndex, choose_factory, parse_memory
    from clipbeam.index.factory import default_train_sample

    n, dim = x.shape
    factory = args.factory if args.factory != "auto" else choose_factory(n, dim, parse_memory(budget)).factory
    train = default_train_sample(factory, n)
    names = ["faiss (.npy)"] + [f"clipbeam {c} shard{'s' if c > 1 else ''}" for c in shards]
    runs: dict[str, list] = {name: [] for name in names}
    for _ in range(args.runs):
        runs[names[0]].append(build_plain(launcher, tmp, budget, factory, train, args))
        for name, count in zip(names[1:], shards, strict=True):
            runs[name].append(build_clipbeam(launcher, tmp, budget, count, args))
    plain = faiss.read_index(os.path.join(tmp, f"plain-{budget}.faiss"))
    faiss.ParameterSpace().set_index_parameters(plain, runs[names[0]][-1][2])
    indexes = {names[0]: plain}
    for name, count in zip(names[1:], shards, strict=True):
        indexes[name] = ShardedIndex.open(os.path.join(tmp, f"idx-{budget}-{count}"))
        assert indexes[name].manifest["factory"] == factory, (indexes[name].manifest["factory"], factory)
    print(f"\n{n} x {dim} clustered ({args.clusters} clusters), {args.dtype} Parquet in {args.parts} parts, "
          f"budget {budget}: {factory}, train sample {train}, target recall@10 {args.target_recall}, "
          f"faiss ground truth by {args.truth}, {os.cpu_count()} cores, {args.runs} alternating run(s)")
    print(f"{'build':<18}{'median s':>9}{'x faiss':>9}{'peak RSS MB':>13}  {'params':<12}{'recall@10':>10}"
          f"{'queries/s':>11}  raw seconds")
    base = float(np.median([r[0] for r in runs[names[0]]]))
    for name in names:
        seconds = [r[0] for r in runs[name]]
        index = indexes[name]
        params = index.search_params if name != names[0] else runs[name][-1][2]
        recall, qps = measure(index, x, eval_ids, truth)
        print(f"{name:<18}{np.median(seconds):>9.1f}{np.median(seconds) / base:>9.2f}"
              f"{max(r[1] for r in runs[name]) / 2**20:>13.0f}  {params:<12}{recall:>10.4f}{qps:>11.0f}  "
              + " ".join(f"{v:.1f}" for v in seconds), flush=True)
    print_stages(runs, names)
    if len(shards) and shards[-1] > 1:
        search_table(indexes[names[0]], indexes[names[-1]], names[-1], x, args)


def print_stages(runs: dict[str, list], names: list[str]) -> None:
    """Median seconds per stage: plain faiss' own laps beside each clipbeam build's summary."""
    plain = median_stages([r[3] for r in runs[names[0]]])
    ours = {name: median_stages([r[2] for r in runs[name]]) for name in names[1:]}
    print(f"{'stage (median s)':<18}{'faiss':>9}" + "".join(f"{name.replace('clipbeam ', 'cb '):>12}"
                                                            for name in names[1:]))
    for stage in STAGE_ORDER:
        if stage in plain or any(stage in o for o in ours.values()):
            print(f"{stage:<18}{plain.get(stage, 0.0):>9.2f}" + "".join(f"{ours[name].get(stage, 0.0):>12.2f}"
                                                                       for name in names[1:]))


def search_table(plain: faiss.Index, sharded, name: str, x: np.ndarray, args: argparse.Namespace) -> None:
    """Batched search, queries/s at --batch: the sharded index vs one faiss index with the same parameters."""
    faiss.ParameterSpace().set_index_parameters(plain, sharded.search_params)
    queries = x[np.random.default_rng(7).choice(len(x), args.search_queries, replace=False)]
    sides = {"faiss, 1 index": plain, name: sharded}
    raw: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.runs):
        for side, index in sides.items():
            index.search(queries[:args.batch], K)
            start = time.perf_counter()
            for first in range(0, len(queries), args.batch):
                index.search(queries[first:first + args.batch], K)
            raw[side].append(len(queries) / (time.perf_counter() - start))
    base = float(np.median(raw["faiss, 1 index"]))
    print(f"{'search, batch ' + str(args.batch):<18}{'queries/s':>11}{'x faiss':>9}  params "
          f"{sharded.search_params or '(none)'}, k={K}, {len(queries)} queries, raw queries/s")
    for side, values in raw.items():
        print(f"{side:<18}{np.median(values):>11.0f}{np.median(values) / base:>9.2f}  "
              + " ".join(f"{v:.0f}" for v in values), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored type, as embed's")
    parser.add_argument("--small-budget", default="32MB", help="budget of the IVF-PQ case at the first --n ('' skips)")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--runs", type=int, default=None,
                        help="alternating runs of each side, medians reported (default 3; 1 with --quick)")
    parser.add_argument("--truth", default="blas", choices=["blas", "flat"],
                        help="plain faiss' ground truth: blocked BLAS top-k or IndexFlat.search")
    parser.add_argument("--factory", default="auto", help="both sides' factory (default: clipbeam's auto choice)")
    parser.add_argument("--batch", type=int, default=256, help="query batch of the search table")
    parser.add_argument("--search-queries", type=int, default=8192, help="queries of the search table")
    parser.add_argument("--clipbeam-args", nargs=argparse.REMAINDER, default=[],
                        help="passed on to clipbeam index (e.g. --runner DirectRunner for the Beam path); last")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 20000 x 64, 100 clusters, IVF256,Flat, no small budget")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        plain_faiss(**json.loads(args.worker))
        return
    if args.quick:
        args.n, args.dim, args.clusters, args.small_budget = [20_000], 64, 100, ""
        args.runs = args.runs or 1
        args.factory = "IVF256,Flat" if args.factory == "auto" else args.factory
        args.search_queries = min(args.search_queries, 2048)
    args.runs = args.runs or 3
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
            truth = exact_top(x, x[eval_ids], K + 1)
            run_case(launcher, tmp, x, eval_ids, truth, DEFAULT_BUDGET, [4], args)
            if number == 0 and args.small_budget:
                run_case(launcher, tmp, x, eval_ids, truth, args.small_budget, [1, 4], args)


if __name__ == "__main__":
    main()
