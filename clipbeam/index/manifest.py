"""The index folder layout and its index.json manifest.

index.json is written last: its presence means the index is complete. It
carries everything a reader needs to get the recall it states: the factory and
why it was chosen, the tuned search parameters (re-applied at every open,
unlike a bare faiss file), the measured recall@10 and queries/s, each shard's
global id range, size and vector count, and the embeddings it was built from.
"""

from __future__ import annotations

from typing import Any

from clipbeam import storage
from clipbeam.index.errors import IndexInputError

INDEX_JSON = "index.json"
TRAINED_INDEX = "trained.faiss"
FORMAT = "clipbeam.index"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("factory", "metric", "dim", "ntotal", "search_params", "shards")


def shard_index_name(number: int) -> str:
    return f"shard-{number:05d}.faiss"


def shard_ids_name(number: int) -> str:
    return f"shard-{number:05d}.ids.parquet"


def read_manifest(index_url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """index.json of an index folder, checked for the keys readers rely on."""
    url = storage.join(index_url, INDEX_JSON)
    try:
        manifest = storage.read_json(url, storage_options)
    except FileNotFoundError:
        raise IndexInputError(f"{index_url} has no {INDEX_JSON}: not a clipbeam index, or its build "
                              "has not finished") from None
    except ValueError as exc:
        raise IndexInputError(f"{url} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexInputError(f"{url} is not a clipbeam index manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise IndexInputError(f"{url} has format version {manifest['version']}; this clipbeam reads up to "
                              f"{FORMAT_VERSION}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise IndexInputError(f"{url} lacks {', '.join(missing)}")
    return manifest


def query_decoding(manifest: dict[str, Any], max_pixels: int) -> tuple[int, bool]:
    """(pixel cap, reduced-scale JPEG decoding) for query images of an index: the one rule search and
    serve share. A query photo is decoded as embed decoded its copy in the corpus (older manifests:
    exact decoding), under the smaller of embed's pixel cap and the caller's own `max_pixels`, so a
    query is never decoded from more pixels than the corpus would have been."""
    for source in manifest.get("embeddings", []):
        info = source.get("manifest") or {}
        if info.get("model"):
            cap = int(info.get("max_pixels") or max_pixels)
            return min(cap, max_pixels), bool(info.get("fast_decode", False))
    return max_pixels, False


def query_model(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The CLIP model (model, pretrained, seed) the indexed embeddings came from, if recorded."""
    for source in manifest.get("embeddings", []):
        info = source.get("manifest") or {}
        if info.get("model"):
            return {"model": info["model"], "pretrained": info.get("pretrained", "none"),
                    "seed": int(info.get("seed", 0) or 0)}
    return None
