"""The Starlette app: routes, the body cap, and one-line JSON errors.

Every client mistake (bad JSON, a wrong vector dimension, an unknown id, an
oversized upload, a route that does not exist) is answered with a 4xx and
`{"error": "one line"}`; none of them reaches the 500 handler or stops the
server. Images are served by faiss id only: a client can never name a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clipbeam.serve import knn
from clipbeam.serve.batcher import Batcher
from clipbeam.serve.engine import Hit, SearchEngine, image_type
from clipbeam.serve.guard import HostCheck, RequestGuard
from clipbeam.serve.queries import ApiError, Query, parse_json, parse_search
from clipbeam.serve.stats import QueryStats

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
IMAGE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'",
                 "Cache-Control": "public, max-age=3600"}
THUMBNAIL_SIZES = (16, 1024)
MAX_WAITING = 1024  # queries queued for the worker beyond this are refused (429), so a flood cannot grow memory


class ByteBudget:
    """Bytes of request bodies held at once, queued or being decoded: past `limit` a request is refused
    (429) as its body arrives, so a flood of uploads cannot grow memory (the query cap counts queries)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @contextlib.asynccontextmanager
    async def body(self, request: Request, max_body: int):
        """The request body (413 past `max_body`), its bytes counted against the budget until the block ends."""
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.held + size > self.limit:
                raise ApiError(429, f"{self.held} bytes of requests are already waiting; retry later")
            self.held += size
            taken += size

        try:
            yield await read_body(request, max_body, take)
        finally:
            self.held -= taken


@dataclass
class ServeState:
    engine: SearchEngine
    batcher: Batcher[Query]
    stats: QueryStats
    static: dict[str, bytes]
    budget: ByteBudget
    decoder: ThreadPoolExecutor  # uploads decode here, so that vector and text queries never wait on them

    async def answer(self, query: Query) -> list[Hit]:
        if self.batcher.waiting >= MAX_WAITING:
            raise ApiError(429, f"{MAX_WAITING} queries are already waiting; retry later")
        if query.image is not None and query.decoded is None:
            decoded = await asyncio.get_running_loop().run_in_executor(self.decoder, self.engine.decode_upload,
                                                                       query.image)
            query = dataclasses.replace(query, image=b"", decoded=decoded)
        found = await self.batcher.submit(query)
        if isinstance(found, ApiError):
            raise found
        return found


def _state(request: Request) -> ServeState:
    return request.app.state.serve


async def read_body(request: Request, limit: int, take: Callable[[int], None] = lambda size: None) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes; `take` hears of each chunk."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise ApiError(413, f"the body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is over the limit of {limit} bytes")
        take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def jsonable(value: Any) -> Any:
    """Id-table values as JSON can carry them (bytes as text, NaN as null)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def capped_json(content: Any, limit: int) -> Response:
    """A JSON answer of at most `limit` bytes, else a 422: the text it carries is measured before it is
    rendered (long captions asked for many times would cost gigabytes), the rendered body after."""
    if _text_size(content) > limit:
        raise ApiError(422, f"the answer would be over the limit of {limit} bytes; ask for fewer ids or results")
    response = JSONResponse(content)
    if len(response.body) > limit:
        raise ApiError(422, f"the answer is {len(response.body)} bytes, over the limit of {limit}; "
                            "ask for fewer ids or results")
    return response


def _text_size(value: Any) -> int:
    """About the size of `value` as JSON, from its strings' lengths (never below the characters)."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        return sum(_text_size(k) + _text_size(v) + 2 for k, v in value.items()) + 2
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) + 1 for v in value) + 2
    return 4


def hit_json(hit: Hit) -> dict[str, Any]:
    return {"faiss_id": hit.faiss_id, "id": jsonable(hit.row.get("id")), "score": round(hit.score, 6),
            "caption": jsonable(hit.row.get("caption")), "source": jsonable(hit.row.get("source")),
            "image_url": f"/image/{hit.faiss_id}"}


async def search(request: Request) -> Response:
    state = _state(request)
    started = time.perf_counter()
    async with state.budget.body(request, state.engine.limits.max_body_bytes) as raw:
        query = parse_search(parse_json(raw), state.engine.limits, state.engine.index.dim)
        hits = await state.answer(query)
    took = time.perf_counter() - started
    state.stats.record(query.kind, took)
    return capped_json({"results": [hit_json(h) for h in hits], "took_ms": round(took * 1000, 3)},
                       state.engine.limits.max_response_bytes)


async def knn_service(request: Request) -> Response:
    state = _state(request)
    started = time.perf_counter()
    engine = state.engine
    modality = "text" if engine.column == "text_embedding" else "image"
    async with state.budget.body(request, engine.limits.max_body_bytes) as raw:
        query, num_images = knn.parse_knn(parse_json(raw), engine.limits, engine.index.dim, engine.name, modality)
        hits = await state.answer(query)
    state.stats.record(query.kind, time.perf_counter() - started)
    return capped_json(knn.knn_results(hits, num_images, str(request.base_url)), engine.limits.max_response_bytes)


async def metadata(request: Request) -> Response:
    state = _state(request)
    async with state.budget.body(request, state.engine.limits.max_body_bytes) as raw:
        ids = knn.parse_metadata_ids(parse_json(raw), state.engine.limits, state.engine.name)
    rows = await run_in_threadpool(state.engine.items, ids)
    base = str(request.base_url)
    return capped_json([{"id": i, "metadata": jsonable(knn.metadata(row, i, base))}
                        for i, row in zip(ids, rows, strict=True)], state.engine.limits.max_response_bytes)


async def indices_list(request: Request) -> Response:
    return JSONResponse([_state(request).engine.name])


async def image(request: Request) -> Response:
    engine = _state(request).engine
    faiss_id = request.path_params["faiss_id"]
    size = request.query_params.get("size")
    if size is None:
        data = await run_in_threadpool(engine.image_bytes, faiss_id)
        return Response(data, media_type=image_type(data), headers=IMAGE_HEADERS)
    lo, hi = THUMBNAIL_SIZES
    if not (size.isascii() and size.isdigit() and len(size) <= 5) or not lo <= int(size) <= hi:  # not '²²
        raise ApiError(400, f"size must be an integer between {lo} and {hi}")
    data = await run_in_threadpool(engine.thumbnail, faiss_id, int(size))
    return Response(data, media_type="image/jpeg", headers=IMAGE_HEADERS)


async def item(request: Request) -> Response:
    engine = _state(request).engine
    faiss_id = request.path_params["faiss_id"]
    row = await run_in_threadpool(engine.item, faiss_id)
    return capped_json({**jsonable(row), "faiss_id": faiss_id, "image_url": f"/image/{faiss_id}"},
                       engine.limits.max_response_bytes)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def stats(request: Request) -> Response:
    state = _state(request)
    manifest = state.engine.index.manifest
    return JSONResponse({
        "index": state.engine.name, "vectors": state.engine.index.ntotal, "shards": len(manifest["shards"]),
        "dim": state.engine.index.dim, "factory": manifest["factory"], "metric": manifest["metric"],
        "search_params": state.engine.default_params, "recall_at_10": manifest.get("recall_at_10"),
        "model": None if state.engine.clip is None else state.engine.clip.spec.model,
        **state.stats.summary(),
    })


async def page(request: Request) -> Response:
    return Response(_state(request).static["index.html"], media_type=STATIC["index.html"], headers=PAGE_HEADERS)


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC or name == "index.html":
        raise ApiError(404, f"no static file {name[:100]!r}")
    return Response(_state(request).static[name], media_type=STATIC[name], headers=PAGE_HEADERS)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    _state(request).stats.reject(exc.status)
    return JSONResponse({"error": exc.message}, status_code=exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    _state(request).stats.reject(exc.status_code)
    message = {404: f"no route {request.url.path[:200]}", 405: f"{request.method} is not allowed here"}
    return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                        headers=exc.headers)


def create_app(engine: SearchEngine, allow_origins: tuple[str, ...] = (), hosts: HostCheck | None = None) -> Starlette:
    """The app for one engine; `allow_origins` lets pages on those origins (clip-retrieval's front) call it;
    `hosts` are the Host names it answers to (None: any, for callers that bind nothing themselves)."""
    files = resources.files("clipbeam.serve") / "static"
    state = ServeState(engine, Batcher(engine.run, initializer=engine.prepare_thread), QueryStats(),
                       {name: (files / name).read_bytes() for name in STATIC},
                       ByteBudget(engine.limits.max_queued_bytes),
                       ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipbeam-decode"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        state.batcher.close()
        state.decoder.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/", page), Route("/static/{name}", static), Route("/healthz", healthz), Route("/stats", stats),
        Route("/search", search, methods=["POST"]), Route("/image/{faiss_id:int}", image),
        Route("/item/{faiss_id:int}", item), Route("/knn-service", knn_service, methods=["POST"]),
        Route("/metadata", metadata, methods=["POST"]), Route("/indices-list", indices_list),
    ]
    middleware = [Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                             allow_headers=["*"])] if allow_origins else []
    middleware.append(Middleware(RequestGuard, hosts=hosts, origins=tuple(allow_origins), reject=state.stats.reject))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error})
    app.state.serve = state
    return app
