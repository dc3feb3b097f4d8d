"""Running the gateway: uvicorn on the FastAPI app, one JSON line per request on stderr. SIGTERM or
Ctrl-C stops accepting connections and lets streams in flight finish (up to `graceful_shutdown`)."""
from __future__ import annotations

import logging
import sys

import uvicorn

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


def run(config: GatewayConfig) -> int:
    _access_log()
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=False,
                                           log_level="warning", timeout_graceful_shutdown=config.graceful_shutdown,
                                           limit_concurrency=config.max_connections))
    logging.getLogger("pagedllm.gateway").info("OpenAI API at http://%s:%d/v1 (replicas: %s)", config.host,
                                               config.port, ", ".join(config.triton))
    server.run()
    return 0
