"""clipbeam serve's routes through the ASGI test client: answers, and a 4xx for every bad input."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import struct
import zlib

import pyarrow.parquet as pq
import pytest
from PIL import Image
from servehelpers import shapes_index
from starlette.testclient import TestClient

from clipbeam.commands import serve
from clipbeam.serve.app import create_app
from clipbeam.serve.engine import SearchEngine
from clipbeam.serve.queries import Limits

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return shapes_index(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(built):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.build_engine(parser.parse_args(["--index", built["index"]]))


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def small_client(engine):
    """The same index and model with tight limits: 4 KB bodies, k <= 5, 10,000 pixels."""
    tight = SearchEngine(engine.index, engine.clip, Limits(max_k=5, max_body_bytes=4096, max_pixels=10_000),
                         engine.name)
    with TestClient(create_app(tight)) as test_client:
        yield test_client


def _stored(built) -> dict[str, dict]:
    rows = pq.read_table(built["emb"] + "/embeddings").to_pylist()
    return {row["id"]: row for row in rows}


def test_text_search_answers_the_documented_shape(client):
    response = client.post("/search", json={"text": "a red circle", "k": 10})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "took_ms"} and body["took_ms"] > 0
    assert len(body["results"]) == 10
    first = body["results"][0]
    assert set(first) == {"faiss_id", "id", "score", "caption", "source", "image_url"}
    assert [r["caption"] for r in body["results"]] == ["a red circle"] * 10
    assert first["image_url"] == f"/image/{first['faiss_id']}"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_image_bytes_are_the_embedded_ones_and_thumbnails_are_jpeg(client, built):
    stored = _stored(built)
    hit = client.post("/search", json={"text": "a blue star", "k": 1}).json()["results"][0]
    full = client.get(hit["image_url"])
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert hashlib.sha256(full.content).hexdigest() == stored[hit["id"]]["sha256"]
    thumb = client.get(hit["image_url"] + "?size=32")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 32


def test_image_vector_and_like_queries_find_the_sample_itself(client, built):
    stored = _stored(built)
    hit = client.post("/search", json={"text": "a green square", "k": 1}).json()["results"][0]
    upload = base64.b64encode(client.get(hit["image_url"]).content).decode()
    vector = [float(v) for v in stored[hit["id"]]["image_embedding"]]
    for query in ({"image": upload}, {"image": "data:image/png;base64," + upload}, {"vector": vector},
                  {"like": hit["faiss_id"]}):
        results = client.post("/search", json={**query, "k": 3}).json()["results"]
        assert results[0]["faiss_id"] == hit["faiss_id"] and results[0]["score"] > 0.999, query.keys()


def test_item_healthz_stats_page(client):
    item = client.get("/item/3").json()
    assert item["faiss_id"] == 3 and {"id", "caption", "source", "source_offset", "source_size"} <= set(item)
    assert client.get("/healthz").json() == {"status": "ok"}
    stats = client.get("/stats").json()
    assert stats["vectors"] == 480 and stats["shards"] == 2 and stats["factory"] == "Flat"
    assert stats["recall_at_10"] == 1.0 and stats["queries_served"] >= 1
    assert stats["by_kind"]["text"]["p50"] > 0 and stats["latency_ms"]["p99"] >= stats["latency_ms"]["p50"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "default-src 'self'" in page.headers[
        "content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")


def _bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG header claiming 400 million pixels (no pixel data needed: the cap is checked first)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_SEARCHES = [
    ("not json", b"{", 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("no query", {"k": 3}, 400, "exactly one"),
    ("two queries", {"text": "a", "vector": [0.0] * 64}, 400, "exactly one"),
    ("unknown field", {"text": "a", "kk": 3}, 400, "unknown field"),
    ("empty text", {"text": "  "}, 400, "non-empty"),
    ("k zero", {"text": "a", "k": 0}, 400, "between 1 and 1000"),
    ("k over the cap", {"text": "a", "k": 1001}, 400, "between 1 and 1000"),
    ("k a string", {"text": "a", "k": "10"}, 400, "integer"),
    ("k a bool", {"text": "a", "k": True}, 400, "integer"),
    ("vector wrong dimension", {"vector": [0.1] * 63}, 400, "needs 64"),
    ("vector of strings", {"vector": ["a"] * 64}, 400, "list of numbers"),
    ("vector with NaN", b'{"vector": [NaN' + b", 0" * 63 + b"]}", 400, "NaN"),
    ("image not base64", {"image": "***"}, 400, "not valid base64"),
    ("image not an image", {"image": _b64(b"hello, world")}, 400, "not a readable image"),
    ("image a bomb", {"image": _b64(_bomb_png())}, 413, "decompression bomb"),
    ("like unknown id", {"like": 10**6}, 404, "unknown id"),
    ("like negative", {"like": -1}, 400, "like must be"),
    ("params unknown", {"text": "a", "params": {"ht": 3}}, 400, "unknown search parameter"),
    ("params out of bounds", {"text": "a", "params": "nprobe=0"}, 400, "between 1 and"),
    ("params not for Flat", {"text": "a", "params": "nprobe=4"}, 400, "do not apply"),
    # issue 22 item 4: these answered 500
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("k of 5000 digits", b'{"text": "a", "k": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("vector with a 400-digit integer", b'{"vector": [' + b"9" * 400 + b", 0" * 63 + b"]}", 400, "too large"),
    ("nprobe Infinity", b'{"text": "a", "params": {"nprobe": Infinity}}', 400, "nprobe must be"),
    ("vector of 1e308", {"vector": [1e308] * 64}, 400, "norm must be finite"),
]


@pytest.mark.parametrize("body, status, words", [case[1:] for case in BAD_SEARCHES],
                         ids=[case[0] for case in BAD_SEARCHES])
def test_bad_searches_get_a_one_line_4xx(client, body, status, words):
    response = client.post("/search", content=body if isinstance(body, bytes) else json.dumps(body), headers=JSON)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error and "\n" not in error and list(response.json()) == ["error"]


BAD_GETS = [
    ("/image/999999", 404, "unknown id"),
    ("/image/99999999999999999999999", 404, "unknown id"),
    ("/image/abc", 404, "no route"),
    ("/image/-1", 404, "no route"),
    ("/image/../../../etc/passwd", 404, "no route"),
    ("/image/%2e%2e%2fetc%2fpasswd", 404, "no route"),
    ("/image/1?size=0", 400, "size must be"),
    ("/image/1?size=big", 400, "size must be"),
    ("/image/1?size=5000", 400, "size must be"),
    ("/image/1?size=²²", 400, "size must be"),
    ("/image/1?size=①", 400, "size must be"),
    ("/item/999999", 404, "unknown id"),
    ("/static/../serve.py", 404, ""),
    ("/static/engine.py", 404, "no static file"),
    ("/search", 405, "not allowed"),
    ("/nowhere", 404, "no route"),
]


@pytest.mark.parametrize("path, status, words", BAD_GETS, ids=[case[0] for case in BAD_GETS])
def test_bad_gets_get_a_one_line_4xx(client, path, status, words):
    response = client.get(path)
    assert response.status_code == status
    assert words in response.json()["error"]


BAD_KNN = [
    ("image_url", {"image_url": "http://127.0.0.1:1/x.png", "modality": "image", "num_images": 5}, 400,
     "fetches no URLs"),
    ("text modality", {"text": "a", "modality": "text", "num_images": 5}, 400, "image embeddings only"),
    ("other index", {"text": "a", "modality": "image", "num_images": 5, "indice_name": "laion5B"}, 404,
     "unknown indice_name"),
    ("no query", {"modality": "image", "num_images": 5}, 400, "give one of"),
    ("num_images zero", {"text": "a", "modality": "image", "num_images": 0}, 400, "num_images"),
    ("num_images over the cap", {"text": "a", "modality": "image", "num_images": 5000}, 400, "num_images"),
    ("embedding wrong dimension", {"embedding_input": [0.5] * 3, "modality": "image", "num_images": 5}, 400,
     "needs 64"),
]


@pytest.mark.parametrize("body, status, words", [case[1:] for case in BAD_KNN], ids=[case[0] for case in BAD_KNN])
def test_bad_knn_requests_get_a_one_line_4xx(client, body, status, words):
    response = client.post("/knn-service", content=json.dumps(body))
    assert response.status_code == status and words in response.json()["error"]


def test_bad_metadata_requests(client):
    assert client.post("/metadata", json={"ids": "1,2"}).status_code == 400
    assert client.post("/metadata", json={"ids": [1, 10**6]}).status_code == 404
    assert client.post("/metadata", json={"ids": [1], "indice_name": "nope"}).status_code == 404


def test_limits_body_k_and_pixels(small_client):
    big = small_client.post("/search", json={"text": "a" * 5000})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    assert small_client.post("/search", json={"text": "a red circle", "k": 6}).status_code == 400
    assert len(small_client.post("/search", json={"text": "a red circle", "k": 5}).json()["results"]) == 5
    picture = io.BytesIO()
    Image.new("RGB", (200, 200), "red").save(picture, format="PNG")  # 40,000 pixels > 10,000
    refused = small_client.post("/search", json={"image": _b64(picture.getvalue())})
    assert refused.status_code == 413 and "decompression bomb" in refused.json()["error"], refused.json()
    knn = small_client.post("/knn-service", content=json.dumps(
        {"text": "a red circle", "modality": "image", "num_images": 2, "num_result_ids": 3000}))
    assert len(knn.json()) == 5  # num_result_ids capped at max k


def test_the_server_survives_every_bad_request(client):
    for _, body, _, _ in BAD_SEARCHES:
        client.post("/search", content=body if isinstance(body, bytes) else json.dumps(body), headers=JSON)
    assert client.get("/healthz").status_code == 200
    assert len(client.post("/search", json={"text": "a red circle", "k": 4}).json()["results"]) == 4
    assert client.get("/stats").json()["rejected"]["400"] >= 10


def test_a_full_queue_is_refused_with_429(client, monkeypatch):
    from clipbeam.serve import app as serve_app

    monkeypatch.setattr(serve_app, "MAX_WAITING", 0)  # as if 0 more queries fitted in the queue
    refused = client.post("/search", json={"text": "a red circle"})
    assert refused.status_code == 429 and "retry later" in refused.json()["error"]
    monkeypatch.undo()
    assert client.post("/search", json={"text": "a red circle"}).status_code == 200


def test_cors_only_for_allowed_origins(engine):
    origin = "https://front.example"
    with TestClient(create_app(engine, (origin,))) as allowed, TestClient(create_app(engine)) as closed:
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        assert allowed.options("/knn-service", headers=preflight).headers["access-control-allow-origin"] == origin
        assert "access-control-allow-origin" not in closed.get("/indices-list", headers={"Origin": origin}).headers


@pytest.mark.parametrize("args, words", [
    (["--index", "/nonexistent/index"], "has no index.json"),
    (["--port", "70000"], "argument --port: must be between 1 and 65535"),
    (["--max-k", "0"], "argument --max-k: must be at least 1, not 0"),
], ids=["missing index", "bad port", "bad max-k"])
def test_bad_arguments_exit_2_with_one_line(built, args, words, capsys):
    from clipbeam.cli import main

    argv = ["serve", *(["--index", built["index"]] if args[0] != "--index" else []), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def _png(mode: str, size: int) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (size, size)).save(out, format="PNG")
    return out.getvalue()


def test_uploads_are_bounded_by_their_decoded_bytes(engine):
    """Issue 22 item 5: a 172 KB PNG of 9400x9400 16-bit grey (under --max-pixels) took +1.6 GB."""
    tight = SearchEngine(engine.index, engine.clip, Limits(max_decoded_bytes=1_000_000), engine.name)
    with TestClient(create_app(tight)) as client:
        grey16 = _png("I;16", 1000)  # 2 MB decoded (and 6 MB as RGB) from a few KB of PNG
        refused = client.post("/search", json={"image": _b64(grey16)})
        assert refused.status_code == 413 and "decoded" in refused.json()["error"]
        assert client.post("/search", json={"image": _b64(_png("RGB", 200))}).status_code == 200


@pytest.mark.timeout(300)
def test_image_decodes_never_hold_up_vector_queries_and_queued_bytes_are_capped(engine):
    """Issue 22 item 5: with 6 uploads in flight a vector query waited 24 s; queued uploads were capped by
    count, not bytes. An upload whose decode is held keeps its lane busy; a vector query still answers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    picture = io.BytesIO()
    Image.fromarray(noise).save(picture, format="PNG")  # about 270 KB: far more than a vector query's body
    upload = _b64(picture.getvalue())
    lane = SearchEngine(engine.index, engine.clip, Limits(max_queued_bytes=len(upload) * 3 // 2), engine.name)
    release, entered = threading.Event(), threading.Event()
    decode = lane.decode_upload

    def held_decode(data: bytes):
        entered.set()
        release.wait(60)
        return decode(data)

    lane.decode_upload = held_decode
    with TestClient(create_app(lane)) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/search", json={"image": upload})
        assert entered.wait(60)
        vector = client.post("/search", json={"vector": [0.1] * 64, "k": 3})
        assert vector.status_code == 200 and not slow.done()  # answered while the upload is still decoding
        second = client.post("/search", json={"image": upload})
        assert second.status_code == 429 and "bytes" in second.json()["error"]
        release.set()
        assert slow.result(60).status_code == 200
        again = client.post("/search", json={"image": upload})
        assert again.status_code == 200, again.text  # its bytes were given back
