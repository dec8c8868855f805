"""`clipbeam dedup` beside exact faiss range search and hand-written IVF range search; and beside imagededup.

Part 1 (vectors): N x D clustered vectors (tests/synthetic_embeddings.py's generator, --spread 1.0 so
that ordinary neighbours sit near cosine 0.5, as CLIP's do) plus --dup-share planted near-duplicates at
noise levels that put them between cosine 0.91 and 0.995 of their source, written as embed writes them
(float16, 4 parts). Each build runs in its own process (wall seconds and its own peak RSS):
  exact     faiss range search on a flat inner-product index, every vector a query (only n <= --exact-max)
  ivf       what a user writes by hand: IVF (n / --cluster-size lists), nprobe = --probe, range search
  clipbeam  `clipbeam dedup` with --probe and --cluster-size, DirectRunner
  index     `clipbeam index` with its defaults on the same embeddings (the issue's time yardstick)
Pair recall at each threshold: of the pairs exact search links (cos >= t, on the float16 values), the
share that the method links (ivf) or puts in one group (clipbeam). Above --exact-max the truth is the
exact range search of --recall-queries random vectors against all.

Part 2 (images, --images B): B base pictures with planted copies (tests/planted_images.py: exact
copies, JPEG q30/60/95, resizes 50/200%, crops 80/95%, colour shifts, a re-captioned copy) and
distinct pictures sharing a caption, embedded by `clipbeam embed` (--model/--pretrained; offline,
the shipped shapes model, which is not trained on photos), then `clipbeam dedup` at several
thresholds beside imagededup's PHash at several Hamming distances: recall per transformation, precision
over all pairs, seconds. imagededup is not a clipbeam dependency: install it beside the benchmark
(torch and torchvision, which it also needs, come from clipbeam's own environment),
  pip install --target /tmp/imagededup-pkgs --no-deps imagededup==0.3.3.post2 PyWavelets scikit-learn \
      scipy joblib threadpoolctl narwhals cloudpickle
  PYTHONPATH=/tmp/imagededup-pkgs .venv/bin/python benchmarks/dedup.py ...
without it, part 2 prints clipbeam's side only.

Usage: python benchmarks/dedup.py [--sizes/--n 200000 1000000] [--dim 512] [--images 40]
Smoke test: python benchmarks/dedup.py --sizes 3000 --dim 64 --images 3
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

import faiss
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from index_build import Launcher, write_parts  # noqa: E402  (one launcher and one embed writer for benchmarks)

NOISE = (0.1, 0.2, 0.3, 0.45)  # norm of the noise added to a copy: cosine 0.995, 0.98, 0.958, 0.91


def planted_vectors(n: int, dim: int, dup_share: float, spread: float, seed: int = 0) -> np.ndarray:
    from synthetic_embeddings import clustered

    rng = np.random.default_rng(seed)
    copies = int(n * dup_share)
    base = clustered(n - copies, dim, clusters=max(1, n // 200), spread=spread, seed=seed)
    sources = rng.choice(len(base), copies, replace=True)
    noise = rng.standard_normal((copies, dim)).astype(np.float32)
    noise *= (np.array(NOISE, np.float32)[np.arange(copies) % len(NOISE)] / np.linalg.norm(noise, axis=1))[:, None]
    dups = base[sources] + noise
    x = np.concatenate([base, dups / np.linalg.norm(dups, axis=1, keepdims=True)])
    return x[rng.permutation(n)].astype(np.float16).astype(np.float32)  # the values dedup reads back


def range_pairs(index: faiss.Index, queries: np.ndarray, query_ids: np.ndarray, radius: float,
                chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, sim) for every query i and database j != i at inner product >= radius."""
    out_i, out_j, out_s = [], [], []
    for start in range(0, len(queries), chunk):
        lims, sims, ids = index.range_search(queries[start:start + chunk], radius)
        owners = np.repeat(query_ids[start:start + chunk], np.diff(lims).astype(np.int64))
        keep = owners != ids
        out_i.append(owners[keep])
        out_j.append(ids[keep])
        out_s.append(sims[keep])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def worker(spec: dict) -> None:
    """One baseline in its own process: pairs at the lowest threshold, saved for the parent."""
    x = np.load(spec["npy"], mmap_mode="r")
    x = np.ascontiguousarray(x)
    n, dim = x.shape
    if spec["method"] == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, n // spec["cluster_size"])
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        index.train(x[np.sort(rng.choice(n, min(n, max(64 * nlist, 20_000)), replace=False))])
        index.nprobe = spec["probe"]
    index.add(x)
    queries = np.asarray(spec["queries"]) if spec.get("queries") is not None else np.arange(n)
    i, j, s = range_pairs(index, x[queries], queries, spec["radius"])
    np.savez(spec["out"], i=i, j=j, s=s)


def truth_pairs(x: np.ndarray, radius: float, exact_max: int, recall_queries: int, tmp: str,
                launcher: Launcher) -> tuple[dict, float | None, int | None]:
    """The exact pairs (from all vectors, or from a query sample), and the exact build's seconds and RSS."""
    n = len(x)
    spec = {"method": "exact", "npy": os.path.join(tmp, "x.npy"), "radius": radius, "out": os.path.join(tmp, "exact")}
    full = n <= exact_max
    if not full:
        spec["queries"] = np.sort(np.random.default_rng(1).choice(n, min(n, recall_queries), replace=False)).tolist()
    seconds, rss = launcher.run([sys.executable, __file__, "--worker", json.dumps(spec)], spec["out"] + ".log")
    data = dict(np.load(spec["out"] + ".npz"))
    data["queries"] = None if full else np.asarray(spec["queries"])
    return data, (seconds if full else None), (rss if full else None)


def recall_of_pairs(truth: dict, threshold: float, found: set[tuple[int, int]]) -> float:
    keep = truth["s"] >= threshold
    want = {(min(a, b), max(a, b)) for a, b in zip(truth["i"][keep].tolist(), truth["j"][keep].tolist(), strict=True)}
    return len(want & found) / len(want) if want else 1.0


def recall_of_groups(truth: dict, threshold: float, group: dict[int, int]) -> float:
    keep = truth["s"] >= threshold
    pairs = list(zip(truth["i"][keep].tolist(), truth["j"][keep].tolist(), strict=True))
    hits = sum(1 for a, b in pairs if a in group and group.get(a) == group.get(b))
    return hits / len(pairs) if pairs else 1.0


def clipbeam_groups(out: str, thresholds: list[float]) -> dict[float, dict[int, int]]:
    import pyarrow.parquet as pq

    groups: dict[float, dict[int, int]] = {t: {} for t in thresholds}
    for path in sorted(glob.glob(os.path.join(out, "groups", "*.parquet"))):
        table = pq.read_table(path, columns=["id", "group", "threshold"]).to_pydict()
        for i, g, t in zip(table["id"], table["group"], table["threshold"], strict=True):
            match = next(th for th in thresholds if abs(th - t) < 1e-6)
            groups[match][int(i)] = g
    return groups


def vectors_case(n: int, args: argparse.Namespace, launcher: Launcher, tmp: str) -> None:
    thresholds = sorted(args.thresholds, reverse=True)
    low = min(thresholds)
    x = planted_vectors(n, args.dim, args.dup_share, args.spread)
    np.save(os.path.join(tmp, "x.npy"), x)
    write_parts(os.path.join(tmp, "emb"), x, 4, "float16")
    truth, exact_seconds, exact_rss = truth_pairs(x, low, args.exact_max, args.recall_queries, tmp, launcher)
    sample = None if truth["queries"] is None else set(truth["queries"].tolist())

    def in_sample(pairs: set) -> set:
        return pairs if sample is None else {p for p in pairs if p[0] in sample or p[1] in sample}
    rows = []
    if exact_seconds is not None:
        rows.append(("exact faiss range search", exact_seconds, exact_rss, [1.0] * len(thresholds)))
    spec = {"method": "ivf", "npy": os.path.join(tmp, "x.npy"), "radius": low, "out": os.path.join(tmp, "ivf"),
            "cluster_size": args.cluster_size, "probe": args.probe}
    seconds, rss = launcher.run([sys.executable, __file__, "--worker", json.dumps(spec)], spec["out"] + ".log")
    ivf = dict(np.load(spec["out"] + ".npz"))
    found = {t: in_sample({(min(a, b), max(a, b)) for a, b, s in zip(ivf["i"].tolist(), ivf["j"].tolist(),
                                                                    ivf["s"].tolist(), strict=True) if s >= t})
             for t in thresholds}
    rows.append((f"IVF range search, nprobe {args.probe}", seconds, rss,
                 [recall_of_pairs(truth, t, found[t]) for t in thresholds]))
    out = os.path.join(tmp, "dedup")
    command = [sys.executable, "-m", "clipbeam", "dedup", "--embeddings", os.path.join(tmp, "emb"), "--output", out,
               "--probe", str(args.probe), "--cluster-size", str(args.cluster_size), "--gallery-groups", "0",
               *(a for t in thresholds for a in ("--threshold", str(t)))]
    seconds, rss = launcher.run(command, os.path.join(tmp, "dedup.log"))
    groups = clipbeam_groups(out, thresholds)
    rows.append((f"clipbeam dedup, probe {args.probe}", seconds, rss,
                 [recall_of_groups(truth, t, groups[t]) for t in thresholds]))
    seconds, rss = launcher.run([sys.executable, "-m", "clipbeam", "index", "--embeddings", os.path.join(tmp, "emb"),
                                 "--output", os.path.join(tmp, "index")], os.path.join(tmp, "index.log"))
    rows.append(("clipbeam index (yardstick)", seconds, rss, [None] * len(thresholds)))
    basis = "all pairs" if truth["queries"] is None else f"pairs of {len(truth['queries'])} random queries"
    print(f"\n{n} x {args.dim} vectors, {args.dup_share:.0%} planted near-duplicates, cluster size "
          f"{args.cluster_size}, {os.cpu_count()} cores; recall against exact search ({basis})")
    print(f"{'method':<34}{'seconds':>9}{'peak RSS MB':>13}" + "".join(f"{'recall@' + str(t):>14}" for t in thresholds))
    for name, secs, peak, recalls in rows:
        print(f"{name:<34}{secs:>9.1f}{peak / 2**20:>13.0f}" + "".join(
            f"{'-' if r is None else f'{r:.4f}':>14}" for r in recalls), flush=True)
    for path in ("x.npy", "exact.npz", "ivf.npz"):
        os.remove(os.path.join(tmp, path))


def images_case(args: argparse.Namespace, tmp: str) -> None:
    """clipbeam dedup beside imagededup's PHash on a planted image corpus: recall per transformation."""
    from embedhelpers import read_rows
    from planted_images import TRANSFORMS, write_corpus

    from clipbeam.cli import main

    os.makedirs(os.path.join(tmp, "corpus"), exist_ok=True)
    what = write_corpus(os.path.join(tmp, "corpus", "00000.tar"), args.images)
    emb = os.path.join(tmp, "img-emb")
    start = time.monotonic()
    assert main(["embed", "--input", os.path.join(tmp, "corpus", "*.tar"), "--output", emb, "--model", args.model,
                 "--pretrained", args.pretrained, "--no-progress"]) == 0
    embed_seconds = time.monotonic() - start
    keys = {row["id"]: next(k for k in what if row["id"].endswith(k)) for row in read_rows(emb)}
    results = []
    for t in args.image_thresholds:
        out = os.path.join(tmp, f"img-dd-{t}")
        start = time.monotonic()
        assert main(["dedup", "--embeddings", emb, "--output", out, "--threshold", str(t),
                     "--gallery-groups", "0"]) == 0
        pairs = _pairs_of_groups(_groups_by_key(out, keys))
        results.append((f"clipbeam cos >= {t}", time.monotonic() - start, pairs))
    results += _imagededup(tmp, what, args)
    truth = {(min(a, b), max(a, b)) for a in what for b in what
             if a != b and what[a][1] == what[b][1] and what[a][1] < 10_000}
    names = ["original"] + list(TRANSFORMS)
    print(f"\nplanted image corpus: {args.images} bases x {len(TRANSFORMS)} copies + 4 distinct sharing a caption; "
          f"clipbeam embeds with {args.model} / {args.pretrained} in {embed_seconds:.1f}s (not in its rows)")
    print(f"{'method':<26}{'seconds':>8}{'precision':>10}" + "".join(f"{n[:11]:>12}" for n in names[1:]))
    for name, secs, found in results:
        precision = len(found & truth) / len(found) if found else 1.0
        recalls = []
        for transform in names[1:]:
            want = {(min(k, f"b{b}-orig"), max(k, f"b{b}-orig")) for k, (w, b) in what.items() if w == transform}
            recalls.append(len(want & found) / len(want))
        print(f"{name:<26}{secs:>8.1f}{precision:>10.3f}" + "".join(f"{r:>12.2f}" for r in recalls), flush=True)


def _groups_by_key(out: str, keys: dict[str, str]) -> dict[str, int]:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, "groups")).to_pydict()
    return {keys[i]: g for i, g in zip(table["id"], table["group"], strict=True)}


def _pairs_of_groups(groups: dict[str, int]) -> set[tuple[str, str]]:
    members: dict[int, list[str]] = {}
    for key, g in groups.items():
        members.setdefault(g, []).append(key)
    return {(min(a, b), max(a, b)) for m in members.values() for a in m for b in m if a != b}


def _imagededup(tmp: str, what: dict, args: argparse.Namespace) -> list:
    try:
        from imagededup.methods import PHash
    except ImportError:
        print("imagededup is not installed: see this file's docstring for the PHash comparison")
        return []
    import tarfile

    folder = os.path.join(tmp, "images")
    with tarfile.open(os.path.join(tmp, "corpus", "00000.tar")) as tar:
        tar.extractall(folder, filter="data")
    for name in glob.glob(os.path.join(folder, "*.txt")):
        os.remove(name)
    import logging

    logging.getLogger("imagededup").setLevel(logging.WARNING)
    results = []
    for distance in args.phash_distances:
        start = time.monotonic()
        phash = PHash(verbose=False)
        found = phash.find_duplicates(image_dir=folder, max_distance_threshold=distance)
        pairs = {(min(a[:-4], b[:-4]), max(a[:-4], b[:-4])) for a, dups in found.items() for b in dups}
        results.append((f"imagededup PHash d <= {distance}", time.monotonic() - start, pairs))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", "--n", type=int, nargs="*", default=[200_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9])
    parser.add_argument("--dup-share", type=float, default=0.1)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--probe", type=int, default=2)
    parser.add_argument("--cluster-size", type=int, default=1000)
    parser.add_argument("--exact-max", type=int, default=200_000)
    parser.add_argument("--recall-queries", type=int, default=2000)
    parser.add_argument("--images", type=int, default=40, help="base pictures of part 2 (0: skip it)")
    parser.add_argument("--image-thresholds", type=float, nargs="+", default=[0.99, 0.98, 0.95, 0.9])
    parser.add_argument("--phash-distances", type=int, nargs="+", default=[2, 6, 10, 14])
    parser.add_argument("--model", default="shapes-clip")
    parser.add_argument("--pretrained", default="shapes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    launcher = Launcher()
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="clipbeam-dedup-bench-") as tmp:
            vectors_case(n, args, launcher, tmp)
    if args.images:
        with tempfile.TemporaryDirectory(prefix="clipbeam-dedup-images-") as tmp:
            images_case(args, tmp)


if __name__ == "__main__":
    main()
