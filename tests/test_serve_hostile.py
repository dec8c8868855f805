"""Issue 22, serve: long captions, response and request caps, bad requests, the Host check.

An index over synthetic embeddings (no model: vector queries only), one sample of which carries a
long caption, served through the ASGI test client.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from starlette.testclient import TestClient
from synthetic_embeddings import clustered, write_embed_output

from clipbeam.cli import main
from clipbeam.index import ShardedIndex
from clipbeam.serve.app import create_app
from clipbeam.serve.engine import SearchEngine
from clipbeam.serve.queries import Limits

DIM = 64  # clipbeam-tiny's, the model write_embed_output records (serve loads it)
TIMEOUT = "1"  # seconds a half-sent request is held
LONG = 2_000_000  # characters of sample 0's caption


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-serve")
    emb, idx = str(root / "emb"), str(root / "idx")
    captions = ["x" * LONG] + [f"caption {i}" for i in range(1, 200)]
    write_embed_output(emb, clustered(200, DIM, seed=5).astype(np.float32), parts=2, captions=captions)
    assert main(["index", "--embeddings", emb, "--output", idx, "--index-factory", "Flat",
                 "--runner", "DirectRunner"]) == 0
    return ShardedIndex.open(idx)


def _client(index, **limits) -> TestClient:
    return TestClient(create_app(SearchEngine(index, None, Limits(**limits), "idx")))


def test_the_id_table_takes_long_text_with_64_bit_offsets(index):
    """A take() of one long caption repeated past 2 GB overflowed a `string` column's int32 offsets."""
    table = index._ids_table(0)
    assert table.schema.field("caption").type == pa.large_string()
    assert index.lookup([0, 0, 1])[1]["caption"] == "x" * LONG


def test_an_answer_over_the_response_cap_is_a_one_line_422_counted(index):
    with _client(index, max_response_bytes=8 * LONG) as client:
        refused = client.post("/metadata", json={"ids": [0] * 40})
        assert refused.status_code == 422 and "limit" in refused.json()["error"]
        assert "\n" not in refused.json()["error"]
        assert client.post("/metadata", json={"ids": [0] * 3}).status_code == 200
        assert client.get("/item/0").status_code == 200
        assert client.get("/stats").json()["rejected"]["422"] == 1


def test_embed_caps_long_captions_counted_not_failed(tmp_path, capsys):
    import imagefactory as imgs
    import pyarrow.parquet as pq
    import webdataset as wds
    from embedhelpers import embed, manifest

    shard = str(tmp_path / "00000.tar")
    with wds.TarWriter(shard) as sink:
        sink.write({"__key__": "long", "jpg": imgs.jpeg(1), "txt": "word " * 6000})
        sink.write({"__key__": "short", "jpg": imgs.jpeg(2), "txt": "a short one"})
    out = str(tmp_path / "out")
    assert embed("--input", shard, "--output", out, "--max-caption-chars", "1000") == 0
    assert manifest(out)["failures"] == 0 and manifest(out)["max_caption_chars"] == 1000
    rows = {r["id"]: r for r in pq.read_table(f"{out}/embeddings").to_pylist()}
    long_row = next(r for i, r in rows.items() if i.endswith("long"))
    assert len(long_row["caption"]) <= 1000 and long_row["caption"].startswith("word word")
    assert "truncated from 29999 to 1000" in long_row["caption_note"]
    assert next(r for i, r in rows.items() if i.endswith("short"))["caption"] == "a short one"
    assert "captions truncated  1" in capsys.readouterr().err
    assert main(["embed", "--input", shard, "--output", out, "--max-caption-chars", "0"]) == 2


def _post(client, path, raw: bytes):
    return client.post(path, content=raw, headers={"content-type": "application/json"})


BAD_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"vector": [1], "k": ' + b"9" * 5000 + b"}",
    b'{"vector": [' + b"9" * 400 + b", 0" * (DIM - 1) + b"]}",
    b'{"vector": [' + b", ".join([b"1e308"] * DIM) + b"]}",
    b'{"vector": [' + b", ".join([b"0.5"] * DIM) + b'], "params": {"nprobe": Infinity}}',
]


def test_bad_requests_are_one_line_4xx_counted_in_stats(index):
    with _client(index) as client:
        for body in BAD_BODIES:
            answer = _post(client, "/search", body)
            assert answer.status_code == 400 and "\n" not in answer.json()["error"], answer.text[:200]
        for size in ("²²", "①", "9" * 5000):
            assert client.get(f"/image/1?size={size}").status_code == 400
        assert client.get("/stats").json()["rejected"]["400"] == len(BAD_BODIES) + 3
        assert _post(client, "/search", json.dumps({"vector": [0.5] * DIM}).encode()).status_code == 200


@pytest.fixture
def folder_engine(tmp_path):
    """A folder corpus embedded and indexed, served without a model; (engine, faiss id -> file)."""
    import imagefactory as imgs
    from embedhelpers import embed

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        (folder / f"p{i}.png").write_bytes(imgs.png(i))
    emb, idx = str(tmp_path / "emb"), str(tmp_path / "idx")
    assert embed("--input", str(folder), "--output", emb) == 0
    assert main(["index", "--embeddings", emb, "--output", idx, "--index-factory", "Flat",
                 "--runner", "DirectRunner"]) == 0
    engine = SearchEngine(ShardedIndex.open(idx), None, Limits(max_response_bytes=1 << 20), "idx")
    return engine, {i: engine.item(i)["source"] for i in range(4)}


@pytest.mark.timeout(300)
def test_image_bytes_are_checked_against_what_was_embedded(folder_engine, tmp_path):
    """Item 3: /image/ID served what the stored path pointed to now (a link to /etc/passwd, a 1 GB file)."""
    import os

    engine, files = folder_engine
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("root:x:0:0")
    with TestClient(create_app(engine)) as client:
        original = open(files[0], "rb").read()
        assert client.get("/image/0").content == original
        os.remove(files[1])
        os.symlink(elsewhere, files[1])
        changed = client.get("/image/1")
        assert changed.status_code == 409 and "corpus changed" in changed.json()["error"]
        os.remove(files[2])
        with open(files[2], "wb") as handle:  # sparse: 8 MB that cost nothing to make
            handle.truncate(8 << 20)
        large = client.get("/image/2")
        assert large.status_code == 413 and "over the limit" in large.json()["error"]
        os.remove(files[3])
        os.mkfifo(files[3])
        fifo = client.get("/image/3")
        assert fifo.status_code == 404 and "not a regular file" in fifo.json()["error"]
        assert client.get("/image/3?size=64").status_code == 404
        assert client.get("/stats").json()["rejected"] == {"409": 1, "413": 1, "404": 2}


def test_host_header_and_json_content_type(index):
    """Item 10: DNS rebinding (a foreign Host) and cross-site text/plain POSTs against a local server."""
    from clipbeam.serve.guard import HostCheck

    origin = "https://front.example"
    app = create_app(SearchEngine(index, None, Limits(), "idx"), (origin,), HostCheck.for_bind("127.0.0.1", (origin,)))
    body = json.dumps({"vector": [0.5] * DIM})
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz", headers={"host": "localhost:8765"}).status_code == 200
        assert client.get("/healthz", headers={"host": "[::1]:8765"}).status_code == 200
        assert client.get("/healthz", headers={"host": "front.example"}).status_code == 200
        rebound = client.get("/healthz", headers={"host": "evil.example:8765"})
        assert rebound.status_code == 400 and "does not answer to host" in rebound.json()["error"]
        assert client.get("/healthz", headers={"host": "10.1.2.3:8765"}).status_code == 400
        assert client.post("/search", content=body, headers={"content-type": "application/json"}).status_code == 200
        plain = client.post("/search", content=body, headers={"content-type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        knn = json.dumps({"embedding_input": [0.5] * DIM, "modality": "image", "num_images": 3})
        for origin_header, status in ((origin, 200), (None, 200), ("https://evil.example", 415)):
            headers = {"content-type": "text/plain", **({"origin": origin_header} if origin_header else {})}
            assert client.post("/knn-service", content=knn, headers=headers).status_code == status
        assert client.get("/stats").json()["rejected"] == {"400": 2, "415": 2}
    anywhere = HostCheck.for_bind("0.0.0.0")
    assert anywhere.allows("10.1.2.3:8765") and not anywhere.allows("evil.example")


@pytest.mark.timeout(300)
def test_half_sent_requests_are_dropped_after_the_request_timeout(index):
    """Item 11: 50 half-sent requests were still held after 20 s."""
    import socket
    import time

    import httpx
    from servehelpers import running_server

    with running_server(index.url, "--request-timeout", TIMEOUT) as url:
        port = int(url.rsplit(":", 1)[1])
        held = []
        for i in range(20):
            sock = socket.create_connection(("127.0.0.1", port))
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finished
            else:
                sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"vec")  # a body that never comes
            sock.settimeout(10)
            held.append(sock)
        time.sleep(3)
        assert httpx.get(url + "/healthz").status_code == 200
        for sock in held:
            try:
                assert sock.recv(1024) == b""  # closed by the server
            except ConnectionResetError:
                pass
            sock.close()
        slow = httpx.post(url + "/search", json={"vector": [0.5] * DIM}, timeout=30)
        assert slow.status_code == 200  # a whole request is not cut, whatever the app's time
