"""The gateway's HTTP server: slow headers, and what it imports."""
from __future__ import annotations

import subprocess
import sys


def test_headers_sent_too_slowly_lose_the_connection():
    """The gateway's HTTP protocol, in a real uvicorn: a request whose headers trickle in is cut off at the
    deadline; a prompt one is answered, and its connection is kept for the next request."""
    import socket
    import threading
    import time

    import uvicorn

    from pagedllm.gateway.server import http_protocol

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http=http_protocol(0.5)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        address = sock.getsockname()
        with socket.create_connection(address, timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.3)
            slow.sendall(b"Host: x\r\n")  # still trickling past the deadline
            assert slow.recv(100) == b""  # closed by the server, not answered
        with socket.create_connection(address, timeout=10) as prompt:
            for _ in range(2):
                prompt.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert prompt.recv(1000).endswith(b"ok")
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_gateway_and_the_client_import_no_torch():
    """A gateway container needs none of the engine: importing it (and the client) loads no torch."""
    code = ("import sys, pagedllm.gateway.server, pagedllm_client; "
            "print(sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
