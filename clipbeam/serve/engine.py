"""The model and the index of one server, and what a batch of queries costs them.

A SearchEngine is plain Python (no HTTP): the app hands it batches of typed
queries from one worker thread, so torch and faiss never run two calls at
once (per-request search parameters can then be set and restored on the
shared shards safely). Texts of a batch are encoded in one model call.

"More like this" searches by a sample's stored embedding, read exactly from
the embeddings part that index.json says the faiss id came from (one row
group of the vector column): faiss cannot give it back exactly, since shards
may be PQ-compressed and IDMap shards do not reconstruct by id.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipbeam.corpus.fetch import ImageChanged, ImageTooLarge, ImageUnavailable, fetch_image
from clipbeam.index import IndexInputError, ShardedIndex
from clipbeam.index.manifest import query_decoding
from clipbeam.layout.embeddings.read import InputFile, read_rows, read_value
from clipbeam.serve.queries import ApiError, Limits, Query


@dataclass(frozen=True)
class Hit:
    """One result: the global faiss id, its score and its id-table row (id, caption, source, ...)."""

    faiss_id: int
    score: float
    row: dict[str, Any]


class SearchEngine:
    """An opened index, the CLIP that made its vectors (None: vector and like queries only), and limits."""

    def __init__(self, index: ShardedIndex, clip: Any, limits: Limits, name: str,
                 storage_options: dict | None = None, thumbnail_cache: int = 2048, threads: int = 1) -> None:
        self.index = index
        self.threads = threads
        self.clip = clip
        self.limits = limits
        self.name = name
        self.storage_options = storage_options or {}
        self.default_params = index.search_params
        self._images = None
        if clip is not None:  # uploads decoded as embed decoded the corpus (reduced-scale JPEGs if it did)
            from clipbeam.models.embedder import QueryImages

            self._images = QueryImages(clip, *query_decoding(index.manifest, limits.max_pixels))
        self.thumbnail = functools.lru_cache(maxsize=thumbnail_cache)(self._thumbnail)
        self.stored_vector = functools.lru_cache(maxsize=1024)(self._stored_vector)
        self.stored_sha256 = functools.lru_cache(maxsize=4096)(self._stored_sha256)

    def prepare_thread(self) -> None:
        """Set torch's and faiss's thread counts in the calling thread (OpenMP's setting is per thread:
        left alone, faiss in a new thread spins a team per search and runs several times slower)."""
        import faiss
        import torch

        torch.set_num_threads(self.threads)
        faiss.omp_set_num_threads(self.threads)

    @property
    def column(self) -> str:
        """The embeddings column the index was built from (image_embedding unless told otherwise)."""
        return self.index.manifest.get("column") or "image_embedding"

    def run(self, queries: list[Query]) -> list[list[Hit] | ApiError]:
        """Encode and search a batch; a bad query gets its ApiError and the others go on."""
        vectors = self._vectors(queries)
        out: list[list[Hit] | ApiError | None] = [v if isinstance(v, ApiError) else None for v in vectors]
        groups: dict[str | None, list[int]] = {}
        for i, query in enumerate(queries):
            if out[i] is None:
                groups.setdefault(query.params, []).append(i)
        for params, members in groups.items():
            k = max(queries[i].k for i in members)
            try:
                found = self._search(np.concatenate([vectors[i] for i in members]), k, params)
            except ApiError as exc:
                found = [exc] * len(members)
            for i, hits in zip(members, found, strict=True):
                out[i] = hits if isinstance(hits, ApiError) else hits[: queries[i].k]
        return out  # type: ignore[return-value]

    def _vectors(self, queries: list[Query]) -> list[np.ndarray | ApiError]:
        out: list[np.ndarray | ApiError] = []
        texts = [q.text for q in queries if q.text is not None]
        encoded = iter(self._encode_texts(texts) if texts and self.clip is not None else [])
        for query in queries:
            try:
                if query.text is not None:
                    if self.clip is None:
                        raise ApiError(400, "this server has no model (the index records none): send a vector")
                    out.append(next(encoded)[None, :])
                elif query.image is not None:
                    out.append(self._encode_image(query))
                elif query.vector is not None:
                    out.append(query.vector)
                else:
                    out.append(self.stored_vector(query.like))
            except ApiError as exc:
                out.append(exc)
        return out

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        from clipbeam.models.clip import encode_texts

        return encode_texts(self.clip, texts)

    def decode_upload(self, data: bytes) -> Any:
        """Uploaded bytes -> image, decoded as embed decodes corpus images (same pixel cap), and refused
        (413) when it would take more than `max_decoded_bytes` decoded. Runs off the query worker."""
        from clipbeam.models.images import DecodeError

        if self._images is None:
            raise ApiError(400, "this server has no model (the index records none): send a vector")
        size = decoded_size(data)
        if size > self.limits.max_decoded_bytes:
            raise ApiError(413, f"image: it would take {size} bytes decoded; "
                                f"the limit is {self.limits.max_decoded_bytes}")
        try:
            return self._images.pixels(data)
        except DecodeError as exc:
            status = 413 if "decompression bomb" in str(exc) else 400
            raise ApiError(status, f"image: {exc}") from None

    def _encode_image(self, query: Query) -> np.ndarray:
        """An image query -> vector, through embed's own pixel path (models.embedder.QueryImages)."""
        pixels = query.decoded if query.decoded is not None else self.decode_upload(query.image)
        return self._images.encode([pixels])

    def _search(self, vectors: np.ndarray, k: int, params: str | None) -> list[list[Hit]]:
        if params:
            try:
                self.index.set_search_params(params)
            except IndexInputError:
                self.index.set_search_params(self.default_params)
                factory = self.index.manifest["factory"]
                raise ApiError(400, f"search parameters {params!r} do not apply to this {factory} index") from None
        try:
            scores, ids = self.index.search(vectors, k)
        finally:
            if params:
                self.index.set_search_params(self.default_params)
        rows = self.index.lookup(ids)  # the whole batch at once: a lookup costs more per call than per row
        out = []
        for q, (row_scores, row_ids) in enumerate(zip(scores, ids, strict=True)):
            found = rows[q * k:(q + 1) * k]
            out.append([Hit(int(i), float(s), row) for s, i, row in zip(row_scores, row_ids, found, strict=True)
                        if i >= 0 and row is not None])
        return out

    def item(self, faiss_id: int) -> dict[str, Any]:
        """The id-table row of an indexed sample; ApiError 404 for an id the index does not hold."""
        return self.items([faiss_id])[0]

    def items(self, faiss_ids: list[int]) -> list[dict[str, Any]]:
        """The id-table rows of indexed samples, in one lookup; ApiError 404 for the first id the index
        does not hold."""
        in_range = list(dict.fromkeys(i for i in faiss_ids if 0 <= i < 2**63))  # each id looked up once
        found = dict(zip(in_range, self.index.lookup(in_range), strict=True)) if in_range else {}
        rows = [found.get(i) for i in faiss_ids]
        for faiss_id, row in zip(faiss_ids, rows, strict=True):
            if row is None:
                raise ApiError(404, f"unknown id {faiss_id}")
        return rows

    def image_bytes(self, faiss_id: int) -> bytes:
        """The sample's image bytes, checked: at most the response cap, and the bytes that were embedded."""
        row = self.item(faiss_id)
        try:
            return fetch_image(row, self.storage_options, self.limits.max_response_bytes,
                               row.get("sha256") or self.stored_sha256(faiss_id))
        except ImageTooLarge as exc:
            raise ApiError(413, f"image of id {faiss_id} is too large to send: {exc}") from None
        except ImageChanged as exc:
            raise ApiError(409, f"image of id {faiss_id}: the corpus changed since it was embedded ({exc})") from None
        except ImageUnavailable as exc:
            raise ApiError(404, f"image of id {faiss_id} is unavailable: {exc}") from None

    def _stored_sha256(self, faiss_id: int) -> str | None:
        """The sha256 the embeddings row recorded for a sample (None where the embeddings have none)."""
        for source in self.index.manifest.get("embeddings", []):
            for entry in source.get("files", []):
                start, rows = int(entry["id_start"]), int(entry["rows"])
                if start <= faiss_id < start + rows:
                    try:
                        return read_value(entry["url"], "sha256", faiss_id - start, self.storage_options)
                    except (OSError, ValueError, IndexInputError) as exc:
                        raise ApiError(404, f"image of id {faiss_id} cannot be checked against its "
                                            f"embeddings row: {exc}") from None
        return None

    def _thumbnail(self, faiss_id: int, size: int) -> bytes:
        """A JPEG whose longest side is `size` (cached: thumbnails are asked for again and again)."""
        from PIL import Image

        from clipbeam.models.images import DecodeError, decode_image

        try:
            image = decode_image(self.image_bytes(faiss_id), self.limits.max_pixels)
        except DecodeError as exc:
            raise ApiError(404, f"image of id {faiss_id} does not decode: {exc}") from None
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def _stored_vector(self, faiss_id: int) -> np.ndarray:
        self.item(faiss_id)
        for source in self.index.manifest.get("embeddings", []):
            for entry in source.get("files", []):
                start, rows = int(entry["id_start"]), int(entry["rows"])
                if start <= faiss_id < start + rows:
                    return self._read_vector(InputFile(entry["url"], rows, start), source, faiss_id)
        raise ApiError(404, f"index.json names no embeddings file for id {faiss_id}")

    def _read_vector(self, file: InputFile, source: dict, faiss_id: int) -> np.ndarray:
        column = source.get("column") or self.column
        try:
            vectors, _ = read_rows(file, column, self.index.dim, np.array([faiss_id - file.id_start]),
                                   storage_options=self.storage_options)
        except (OSError, ValueError, IndexInputError) as exc:
            raise ApiError(404, f"stored embedding of id {faiss_id} is unavailable: {exc}") from None
        if len(vectors) != 1:
            raise ApiError(404, f"sample {faiss_id} has no stored vector")
        return vectors


def image_type(data: bytes) -> str:
    """The MIME type of image bytes, from their header."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return Image.MIME.get(image.format or "", "application/octet-stream")
    except Exception:  # not an image PIL knows: let the browser decide nothing
        return "application/octet-stream"


def decoded_size(data: bytes) -> int:
    """The bytes an upload takes decoded to RGB (or wider, for 16-bit and float modes), from its header
    alone; 0 for bytes PIL cannot open (the decode then says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            depth = 4 if image.mode in ("I", "F") else 2 if "16" in image.mode else 1
            bands = len(image.getbands())
    except Exception:
        return 0
    return width * height * max(3, bands * depth)
