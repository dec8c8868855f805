"""Checks on every request before it reaches a route: the Host header and the JSON content type.

A server on 127.0.0.1 is reachable from any page a local browser opens. Two
checks close the two ways such a page gets in. DNS rebinding points a name
the page controls at 127.0.0.1, so its requests carry that name as Host: the
Host must be an address the server was bound to, a loopback name, a host of
an `--allow-origin` or an `--allow-host` name (any IP address when bound to
all interfaces). A cross-site form or `text/plain` fetch needs no CORS
preflight, so the JSON routes take `application/json` only; clip-retrieval's
front posts without a content type, so its routes (/knn-service, /metadata)
also take one from an allowed Origin, or from clients that send no Origin (no
browser page does that). Refusals are one-line JSON 4xx, counted in /stats.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

JSON_ROUTES = ("/search", "/knn-service", "/metadata")
CLIP_BACK_ROUTES = ("/knn-service", "/metadata")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class HostCheck:
    """The Host names a server answers to."""

    names: frozenset[str]
    any_address: bool = False  # bound to all interfaces: any IP literal is one of its addresses

    @classmethod
    def for_bind(cls, host: str, origins: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> "HostCheck":
        names = {*LOOPBACK_NAMES, host.strip("[]").lower(), *(n.lower() for n in extra)}
        names |= {(urlsplit(o).hostname or "").lower() for o in origins} - {""}
        return cls(frozenset(names), host in ("0.0.0.0", "::", ""))

    def allows(self, host_header: str) -> bool:
        name = _host_name(host_header)
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return self.any_address


def _host_name(header: str) -> str:
    """'Example.com:8765' -> 'example.com'; '[::1]:8765' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    """ASGI middleware: the Host check (when `hosts` is given) and the JSON content type."""

    def __init__(self, app, hosts: HostCheck | None, origins: tuple[str, ...],
                 reject: Callable[[int], None]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(origins)
        self.reject = reject

    def problem(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if self.hosts is not None and host is not None and not self.hosts.allows(host):
            return 400, f"this server does not answer to host {host[:100]!r} (see serve --allow-host)"
        if scope["method"] != "POST" or scope["path"] not in JSON_ROUTES:
            return None
        if _is_json(headers.get("content-type", "")):
            return None
        origin = headers.get("origin")
        if scope["path"] in CLIP_BACK_ROUTES and (origin is None or origin in self.origins):
            return None
        return 415, "send the body as JSON with Content-Type: application/json"

    async def __call__(self, scope, receive, send) -> None:
        found = self.problem(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        status, message = found
        self.reject(status)
        await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
