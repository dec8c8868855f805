"""Shared fixtures: a real S3 API on loopback (moto's server mode), offline hub."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def _moto_server():
    from moto.server import ThreadedMotoServer

    # Credentials that only the loopback server accepts; never real ones.
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_server(_moto_server):
    """A fresh bucket on the loopback S3 server.

    Yields {"endpoint_url", "storage_options", "bucket"}; storage_options is what
    `--storage-options` takes (as a dict; json.dumps it for the CLI).
    """
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=_moto_server, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    storage_options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": _moto_server, "region_name": "us-east-1"},
    }
    yield {"endpoint_url": _moto_server, "storage_options": storage_options, "bucket": bucket}
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
