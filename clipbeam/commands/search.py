"""Query a sharded index with text, an image or vectors (`clipbeam search`).

Text and images are encoded with the model the indexed embeddings were made
with (recorded in index.json); results come from every shard, merged exactly,
with the tuned search parameters applied. Prints rank, score, id, caption and
source, or one JSON object a line with --json.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import numpy as np

from clipbeam import storage
from clipbeam.commands.argtypes import positive_int
from clipbeam.commands.common import add_storage_arguments, storage_options_from_args, unrecognized
from clipbeam.commands.query_model import add_query_model_arguments, load_query_model, query_spec
from clipbeam.errors import UsageError
from clipbeam.index import ShardedIndex
from clipbeam.index.manifest import query_decoding, query_model
from clipbeam.models.images import DEFAULT_MAX_PIXELS, DecodeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=storage.absolute_url,
                        help="index folder written by `clipbeam index` (any fsspec URL)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", action="append", help="text query (repeat for several)")
    what.add_argument("--image", action="append", help="image path or URL (repeat for several)")
    what.add_argument("--vectors", help=".npy file with one query vector [D] or several [N, D]")
    parser.add_argument("-k", "--k", type=positive_int, default=10, help="results per query (default %(default)s)")
    parser.add_argument("--params", default=None, help="search parameters instead of the tuned ones, e.g. nprobe=64")
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    add_storage_arguments(parser)
    add_query_model_arguments(parser)


def _load_vectors(url: str, storage_options: dict) -> np.ndarray:
    try:
        with storage.open_input(url, storage_options) as handle:
            vectors = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--vectors {url} does not exist") from None
    except ValueError as exc:
        raise UsageError(f"--vectors {url} is not a .npy array: {exc}") from None
    return vectors[None, :] if vectors.ndim == 1 else vectors


def _encode_images(clip, urls: list[str], index: ShardedIndex, storage_options: dict) -> np.ndarray:
    """Query images -> vectors, decoded and preprocessed exactly as `clipbeam embed` does corpus images."""
    from clipbeam.models.embedder import QueryImages

    queries = QueryImages(clip, *query_decoding(index.manifest, DEFAULT_MAX_PIXELS))
    images = []
    for url in urls:
        try:
            images.append(queries.pixels(storage.read_bytes(url, storage_options)))
        except FileNotFoundError:
            raise UsageError(f"--image {url} does not exist") from None
        except DecodeError as exc:
            raise UsageError(f"--image {url} is not a readable image: {exc}") from None
    return queries.encode(images)


def queries_from_args(args: argparse.Namespace, index: ShardedIndex,
                      storage_options: dict) -> tuple[list[str], np.ndarray]:
    """(labels, vectors [N, D]) for --text, --image or --vectors."""
    if args.vectors:
        vectors = _load_vectors(args.vectors, storage_options)
        if vectors.ndim != 2 or vectors.shape[1] != index.dim:
            raise UsageError(f"--vectors {args.vectors} has shape {tuple(vectors.shape)}; the index needs "
                             f"[N, {index.dim}]")
        return [f"{args.vectors}[{i}]" for i in range(len(vectors))], vectors.astype(np.float32)
    from clipbeam.models.clip import encode_texts

    clip = load_query_model(query_spec(args, query_model(index.manifest)), index.dim, storage_options)
    if args.text:
        return list(args.text), encode_texts(clip, args.text)
    return list(args.image), _encode_images(clip, args.image, index, storage_options)


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if beam_args:
        raise unrecognized(beam_args)
    storage_options = storage_options_from_args(args)
    index = ShardedIndex.open(args.index, storage_options)
    if args.params is not None:
        index.set_search_params(args.params)
    labels, vectors = queries_from_args(args, index, storage_options)
    scores, ids = index.search(vectors, args.k)
    out = sys.stdout
    for q, label in enumerate(labels):
        found = [(float(s), int(i)) for s, i in zip(scores[q], ids[q], strict=True) if i >= 0]
        rows = index.lookup([i for _, i in found])
        if not args.json:
            out.write(f"# {label}\n")
        for rank, ((score, faiss_id), row) in enumerate(zip(found, rows, strict=True), start=1):
            row = row or {}
            if args.json:
                record = {"query": label, "rank": rank, "score": round(score, 6), "faiss_id": faiss_id}
                record.update({k: v for k, v in row.items() if k != "faiss_id"})
                out.write(json.dumps(record, default=str) + "\n")
            else:
                out.write(f"{rank}\t{score:.4f}\t{row.get('id', faiss_id)}\t{row.get('caption') or ''}\t"
                          f"{row.get('source') or ''}\n")
    return 0
