"""Request bodies -> typed queries, or an ApiError with a 4xx status and one line.

Everything a client sends is checked here, before any model or index work:
JSON shape, exactly one kind of query, k within the cap, vector dimension and
finiteness, base64 and size of uploads, and search parameters (only the
known knobs, with bounds, so that one request cannot make a search arbitrarily
slow). Image bytes are decoded later, under the pixel cap, by the engine.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipbeam.models.images import DEFAULT_MAX_PIXELS

# Search parameters a client may set, with the largest value accepted.
PARAM_LIMITS = {"nprobe": 65_536, "efSearch": 16_384}
MAX_TEXT_CHARS = 2_000


class ApiError(Exception):
    """A client error: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = " ".join(message.split())


MAX_VECTOR_NORM = 1e15  # float32 scores and squared distances of larger vectors overflow


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_k: int = 1000
    max_body_bytes: int = 16 * 1024 * 1024
    max_response_bytes: int = 64 * 1024 * 1024  # any one answer (long captions asked for many times)
    max_decoded_bytes: int = 64 * 1024 * 1024  # one upload once decoded (a small PNG of 16-bit grey is huge)
    max_queued_bytes: int = 256 * 1024 * 1024  # request bodies held at once, queued or being decoded
    max_pixels: int = DEFAULT_MAX_PIXELS  # embed's cap


@dataclass(frozen=True)
class Query:
    """One search: exactly one of text, image (bytes), vector or like (a faiss id whose stored vector is used)."""

    k: int
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None
    like: int | None = None
    params: str | None = None
    decoded: Any = None  # the image, decoded off the worker (SearchEngine.decode_upload); `image` is then b""

    @property
    def kind(self) -> str:
        for kind in ("text", "image", "vector", "like"):
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a Query always has one kind")


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (any content type: clip-retrieval's front sends text/plain)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise ApiError(400, f"the body is not valid JSON: {exc}"[:300]) from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    return value


def parse_k(value: Any, limits: Limits, name: str = "k") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, not {value!r}"[:200])
    if not 1 <= value <= limits.max_k:
        raise ApiError(400, f"{name} must be between 1 and {limits.max_k}, not {value}")
    return value


def parse_params(value: Any) -> str | None:
    """{"nprobe": 16} or "nprobe=16" -> "nprobe=16"; only PARAM_LIMITS keys, positive integers within bounds."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        pairs = [item.partition("=") for item in value.split(",")]
        value = {key.strip(): text.strip() for key, _, text in pairs}
    if not isinstance(value, dict):
        raise ApiError(400, "params must be an object like {\"nprobe\": 16} or a string like \"nprobe=16\"")
    out = []
    for key, raw in value.items():
        if key not in PARAM_LIMITS:
            raise ApiError(400, f"unknown search parameter {key!r} (known: {', '.join(PARAM_LIMITS)})"[:300])
        try:
            number = int(raw) if not isinstance(raw, bool) else None
        except (TypeError, ValueError, OverflowError):  # OverflowError: Infinity
            number = None
        if number is None or not 1 <= number <= PARAM_LIMITS[key]:
            raise ApiError(400, f"{key} must be an integer between 1 and {PARAM_LIMITS[key]}"[:300])
        out.append(f"{key}={number}")
    return ",".join(out)


def parse_vector(value: Any, dim: int, name: str = "vector") -> np.ndarray:
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in value):
        raise ApiError(400, f"{name} must be a list of numbers")
    if len(value) != dim:
        raise ApiError(400, f"{name} has {len(value)} values; this index needs {dim}")
    try:
        numbers = np.asarray([float(v) for v in value], dtype=np.float64)
    except OverflowError:  # an integer of hundreds of digits
        raise ApiError(400, f"{name} holds a number too large for a float") from None
    if not np.isfinite(numbers).all():
        raise ApiError(400, f"{name} holds a NaN or infinite value")
    with np.errstate(over="ignore"):
        norm = np.linalg.norm(numbers)
    if not norm <= MAX_VECTOR_NORM:  # 1e308 is finite, but its scores overflow to inf
        raise ApiError(400, f"{name} is too large to search: its norm must be finite and at most {MAX_VECTOR_NORM:g}")
    return numbers.astype(np.float32)[None, :]


def parse_image(value: Any, name: str = "image") -> bytes:
    """Base64 (optionally a data: URL) -> bytes; the body cap already bounds its size."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"{name} must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} is not valid base64") from None
    if not data:
        raise ApiError(400, f"{name} is empty")
    return data


def parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "text must be a non-empty string")
    if len(value) > MAX_TEXT_CHARS:
        raise ApiError(400, f"text is longer than {MAX_TEXT_CHARS} characters")
    return value


def parse_like(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, "like must be the id (faiss_id) of an indexed sample")
    return value


def parse_search(body: dict[str, Any], limits: Limits, dim: int) -> Query:
    """A /search body: {text | image | vector | like, k, params}."""
    unknown = sorted(set(body) - {"text", "image", "vector", "like", "k", "params"})
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))}"[:300])
    given = [kind for kind in ("text", "image", "vector", "like") if body.get(kind) is not None]
    if len(given) != 1:
        raise ApiError(400, "give exactly one of text, image (base64), vector or like")
    kind = given[0]
    k = parse_k(body.get("k", min(10, limits.max_k)), limits)
    params = parse_params(body.get("params"))
    value = body[kind]
    if kind == "text":
        return Query(k, text=parse_text(value), params=params)
    if kind == "image":
        return Query(k, image=parse_image(value), params=params)
    if kind == "vector":
        return Query(k, vector=parse_vector(value, dim), params=params)
    return Query(k, like=parse_like(value), params=params)
