"""Running the gateway: uvicorn on the FastAPI app, one JSON line per request on stderr. SIGTERM or
Ctrl-C stops accepting connections and lets streams in flight finish (up to `graceful_shutdown`)."""
from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pagedllm.gateway.app import create_app
from pagedllm.gateway.config import GatewayConfig


def _access_log() -> None:
    """The request log is JSON lines, with no prefix, whatever the rest of the logging looks like."""
    log = logging.getLogger("pagedllm.gateway.access")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def http_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with a deadline on each request's headers: a client that opens a connection, or
    starts its next request, and then sends the headers slowly (slowloris) is cut off after `header_timeout`
    seconds. uvicorn bounds only the idle time between requests; its body reads are the app's (bounded)."""

    class HeaderDeadline(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _late(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadline


def run(config: GatewayConfig) -> int:
    _access_log()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=False,
                                           log_level="warning", timeout_graceful_shutdown=config.graceful_shutdown,
                                           limit_concurrency=config.max_connections,
                                           http=http_protocol(config.header_timeout)))
    logging.getLogger("pagedllm.gateway").info("OpenAI API at http://%s:%d/v1 (replicas: %s)", config.host,
                                               config.port, ", ".join(config.triton))
    server.run()
    return 0
