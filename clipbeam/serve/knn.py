"""clip-retrieval's `clip back` protocol (POST /knn-service, POST /metadata, GET /indices-list).

So that clip-retrieval's own front-end, and scripts written for `clip back`,
work against clipbeam unchanged. Fields honoured: `text`, `image` (base64),
`embedding_input`, `modality` (must be the indexed one), `num_images`,
`num_result_ids` (capped at the server's max k), `indice_name` (this index's
name, or empty). Refused with a 400: `image_url` (the server fetches no URLs).
Accepted and ignored (no such models here): `use_mclip`, `deduplicate`,
`use_safety_model`, `use_violence_detector`, `aesthetic_score`,
`aesthetic_weight`. Answers are clip back's: a list of `{id, similarity}`
(ids are global faiss ids), with `caption` and `url` (this server's /image)
for the first `num_images`.
"""

from __future__ import annotations

from typing import Any

from clipbeam.serve.engine import Hit
from clipbeam.serve.queries import ApiError, Limits, Query, parse_image, parse_k, parse_text, parse_vector


def check_indice(body: dict[str, Any], name: str) -> None:
    indice = body.get("indice_name")
    if indice not in (None, "", name):
        raise ApiError(404, f"unknown indice_name {str(indice)[:100]!r}; this server has [{name!r}]")


def parse_knn(body: dict[str, Any], limits: Limits, dim: int, name: str, modality: str) -> tuple[Query, int]:
    """A /knn-service body -> (query for num_result_ids neighbours, num_images)."""
    check_indice(body, name)
    if body.get("image_url"):
        raise ApiError(400, "image_url is not supported (this server fetches no URLs): send the image as base64")
    asked = body.get("modality", "image")
    if asked not in ("image", "text"):
        raise ApiError(400, f"modality must be image or text, not {str(asked)[:50]!r}")
    if asked != modality:
        raise ApiError(400, f"this index holds {modality} embeddings only (modality {modality!r})")
    num_images = parse_k(body.get("num_images", min(100, limits.max_k)), limits, "num_images")
    num_ids = body.get("num_result_ids", num_images)
    if isinstance(num_ids, bool) or not isinstance(num_ids, int) or num_ids < 1:
        raise ApiError(400, "num_result_ids must be a positive integer")
    k = max(num_images, min(num_ids, limits.max_k))
    if body.get("text"):
        return Query(k, text=parse_text(body["text"])), num_images
    if body.get("image"):
        return Query(k, image=parse_image(body["image"])), num_images
    if body.get("embedding_input") is not None:
        return Query(k, vector=parse_vector(body["embedding_input"], dim, "embedding_input")), num_images
    raise ApiError(400, "give one of text, image (base64) or embedding_input")


def metadata(hit_row: dict[str, Any], faiss_id: int, base_url: str) -> dict[str, Any]:
    return {"caption": hit_row.get("caption"), "url": f"{base_url}image/{faiss_id}"}


def knn_results(hits: list[Hit], num_images: int, base_url: str) -> list[dict[str, Any]]:
    """clip back's answer: metadata for the first num_images, then ids and similarities only."""
    out = []
    for rank, hit in enumerate(hits):
        item = metadata(hit.row, hit.faiss_id, base_url) if rank < num_images else {}
        item.update(id=hit.faiss_id, similarity=hit.score)
        out.append(item)
    return out


def parse_metadata_ids(body: dict[str, Any], limits: Limits, name: str) -> list[int]:
    check_indice(body, name)
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ApiError(400, "ids must be a list of integer ids")
    if len(ids) > limits.max_k:
        raise ApiError(400, f"at most {limits.max_k} ids at a time, not {len(ids)}")
    return ids
