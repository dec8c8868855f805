"""How long a client may take to send one request, and how many connections are served at once.

uvicorn closes idle keep-alive connections, but it waits for slow headers and
slow bodies forever: fifty half-sent requests hold fifty connections. Its h11
protocol is given a deadline here: from the moment a connection opens (or its
previous response ends) the whole request, headers and body, must arrive within
`request_timeout` seconds, else the connection is closed. While the app works
on a request no deadline runs. `uvicorn_limits` gathers the settings `clipbeam
serve` passes to uvicorn.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_REQUEST_TIMEOUT = 15.0
DEFAULT_MAX_CONNECTIONS = 256  # beyond this uvicorn answers 503 (its limit_concurrency)
KEEP_ALIVE_SECONDS = 5


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request is not complete in `request_timeout`."""

    request_timeout = DEFAULT_REQUEST_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request is in: the app's time is not the client's

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def uvicorn_limits(request_timeout: float, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for uvicorn.run: the deadline protocol, keep-alive and the connection cap."""
    protocol = type("DeadlineH11", (DeadlineH11Protocol,), {"request_timeout": request_timeout})
    return {"http": protocol, "timeout_keep_alive": min(KEEP_ALIVE_SECONDS, request_timeout),
            "limit_concurrency": max_connections, "h11_max_incomplete_event_size": 16 * 1024}
