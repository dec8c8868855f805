"""Search an index from a browser or over HTTP (`clipbeam serve`).

Loads the index (shards memory-mapped) and the CLIP that made its vectors
once, then serves the search page, POST /search, GET /image/ID (bytes read
straight from the shards), clip-retrieval's /knn-service, /healthz and
/stats with uvicorn. It has no authentication: it binds 127.0.0.1 unless
--host says otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import posixpath

from clipbeam import storage
from clipbeam.commands.argtypes import port, positive_float, positive_int
from clipbeam.commands.common import add_storage_arguments, storage_options_from_args, unrecognized
from clipbeam.commands.query_model import add_query_model_arguments, load_query_model, query_spec
from clipbeam.errors import UsageError
from clipbeam.index import ShardedIndex
from clipbeam.index.manifest import query_model
from clipbeam.serve.queries import Limits

LOG = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=storage.absolute_url,
                        help="index folder written by `clipbeam index` (any fsspec URL)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default %(default)s; there is no authentication)")
    parser.add_argument("--port", type=port, default=8765, help="port (default %(default)s)")
    parser.add_argument("--name", default=None, help="index name for clip-retrieval clients (default: folder name)")
    parser.add_argument("--max-k", type=positive_int, default=Limits.max_k,
                        help="largest k a request may ask for (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=Limits.max_body_bytes,
                        help="largest request body, uploads included (default %(default)s)")
    parser.add_argument("--max-response-bytes", type=positive_int, default=Limits.max_response_bytes,
                        help="largest answer; a bigger one is refused with a 422 (default %(default)s)")
    parser.add_argument("--max-decoded-bytes", type=positive_int, default=Limits.max_decoded_bytes,
                        help="largest upload once decoded, from its header: 413 beyond (default %(default)s)")
    parser.add_argument("--max-queued-bytes", type=positive_int, default=Limits.max_queued_bytes,
                        help="request bodies held at once, queued or decoding: 429 beyond (default %(default)s)")
    parser.add_argument("--max-pixels", type=positive_int, default=Limits.max_pixels,
                        help="larger uploaded images are refused as decompression bombs (default %(default)s)")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="let pages on ORIGIN call the API (CORS), e.g. a clip-retrieval front; repeatable")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name clients reach the server by (e.g. behind a proxy): requests whose "
                             "Host header is not the bound address, a loopback name, an --allow-origin's host "
                             "or one of these are refused (DNS rebinding); repeatable")
    parser.add_argument("--request-timeout", type=positive_float, default=15.0, metavar="SECONDS",
                        help="a request's headers and body must arrive within this (default %(default)s)")
    parser.add_argument("--max-connections", type=positive_int, default=256,
                        help="connections served at once; more are answered 503 (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch and faiss threads for the query worker (default %(default)s)")
    add_storage_arguments(parser)
    add_query_model_arguments(parser)


def _check(args: argparse.Namespace) -> Limits:
    return Limits(max_k=args.max_k, max_body_bytes=args.max_body_bytes, max_response_bytes=args.max_response_bytes,
                  max_decoded_bytes=args.max_decoded_bytes, max_queued_bytes=args.max_queued_bytes,
                  max_pixels=args.max_pixels)


def build_engine(args: argparse.Namespace):
    """The SearchEngine for the arguments: the index opened, the recorded model loaded (if any)."""
    from clipbeam.serve.engine import SearchEngine

    limits = _check(args)
    so = storage_options_from_args(args)
    index = ShardedIndex.open(args.index, so)  # IndexInputError is a UsageError: one line, exit 2
    recorded = query_model(index.manifest)
    clip = None
    if recorded or args.model:
        clip = load_query_model(query_spec(args, recorded), index.dim, so)
    else:
        LOG.warning("the index records no model and --model is not given: only vector queries will work")
    name = args.name or posixpath.basename(args.index.rstrip("/")) or "index"
    engine = SearchEngine(index, clip, limits, name, so, threads=args.threads)
    engine.prepare_thread()  # this thread too: thumbnails and lookups run outside the worker
    return engine


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    if beam_args:
        raise unrecognized(beam_args)
    try:
        import uvicorn

        from clipbeam.serve.app import create_app
        from clipbeam.serve.guard import HostCheck
        from clipbeam.serve.timeouts import uvicorn_limits
    except ImportError as exc:
        raise UsageError(f"clipbeam serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'clipbeam[serve]'") from None

    engine = build_engine(args)
    if not _is_loopback(args.host):
        LOG.warning("listening on %s: anyone who can reach it can search this index and read its images "
                    "(there is no authentication)", args.host)
    origins = tuple(args.allow_origin)
    app = create_app(engine, origins, HostCheck.for_bind(args.host, origins, tuple(args.allow_host)))
    LOG.info("serving %s (%d vectors) on http://%s:%d/", engine.name, engine.index.ntotal, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                **uvicorn_limits(args.request_timeout, args.max_connections))
    return 0
