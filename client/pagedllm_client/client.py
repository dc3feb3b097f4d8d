"""The synchronous client: gRPC streaming or HTTP generate_stream, one connection per thread reused for
the client's life, retries on overload, a circuit breaker, and cancellation when a stream is left early."""
from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

from tritonclient.utils import InferenceServerException

from pagedllm_client.errors import ClientError, Overloaded, Timeout, from_triton
from pagedllm_client.protocol import (
    Chunk,
    Completion,
    chunk_from_grpc,
    chunk_from_sse,
    grpc_inputs,
    http_error,
    request_fields,
)
from pagedllm_client.resilience import ClientSettings


class Client(ClientSettings):
    """`Client("localhost:8001")` over gRPC, `Client("localhost:8000", protocol="http")` over HTTP.
    Thread-safe: each thread gets its own connection. `timeout` bounds the wait for each response."""

    def _init_transport(self) -> None:
        self._local = threading.local()
        self._connections: list[Any] = []

    def generate(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                 **sampling: Any) -> Completion:
        completion = Completion()
        for chunk in self._chunks(request_fields(prompt, messages, sampling)):
            completion.add(chunk)
        return completion

    def stream(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yield text deltas as they are generated; leaving early cancels the request on the server."""
        for chunk in self._chunks(request_fields(prompt, messages, sampling)):
            if chunk.text:
                yield chunk.text

    def _chunks(self, fields: dict[str, Any]) -> Iterator[Chunk]:
        attempt = 0
        while True:
            attempt += 1
            self._begin_attempt()
            started = False
            with closing(self._send(fields)) as chunks:
                try:
                    for chunk in chunks:
                        started = True
                        yield chunk
                except ClientError as error:
                    time.sleep(self._retry_delay(error, attempt, started))
                    continue
                except GeneratorExit:  # the caller left early: the server was answering
                    self._record(None)
                    raise
            self._record(None)
            return

    def _send(self, fields: dict[str, Any]) -> Iterator[Chunk]:
        if self.protocol == "grpc":
            return self._send_grpc(fields)
        return self._send_http(fields)

    # ---- gRPC: one bidirectional stream per request on the thread's connection -----------------
    def _grpc(self) -> Any:
        if getattr(self._local, "grpc", None) is None:
            import tritonclient.grpc as grpcclient
            self._local.grpc = grpcclient.InferenceServerClient(self.url)
            with self._lock:
                self._connections.append(self._local.grpc)
        return self._local.grpc

    def _send_grpc(self, fields: dict[str, Any]) -> Iterator[Chunk]:
        client, results = self._grpc(), queue.Queue()
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer(self.model, grpc_inputs(fields), model_version=self.model_version,
                                      enable_empty_final_response=True)
            while not finished:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise Timeout(f"{self.model}: no response within {self.timeout}s") from None
                if error is not None:
                    finished = True  # an error response is the request's last
                    raise from_triton(error)
                chunk = chunk_from_grpc(result)
                finished = chunk.final
                yield chunk
        except InferenceServerException as e:
            raise from_triton(e) from None
        finally:
            client.stop_stream(cancel_requests=not finished)

    # ---- HTTP: POST generate_stream, server-sent events; closing the connection cancels ---------
    def _http(self) -> http.client.HTTPConnection:
        if getattr(self._local, "http", None) is None:
            self._local.http = http.client.HTTPConnection(self.url, timeout=self.timeout)
            with self._lock:
                self._connections.append(self._local.http)
        return self._local.http

    def _send_http(self, fields: dict[str, Any]) -> Iterator[Chunk]:
        conn, finished = self._http(), False
        version = f"/versions/{self.model_version}" if self.model_version else ""
        try:
            try:
                conn.request("POST", f"/v2/models/{self.model}{version}/generate_stream", body=json.dumps(fields),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
            except TimeoutError:
                raise Timeout(f"{self.model}: no response within {self.timeout}s") from None
            except OSError as e:
                raise Overloaded(f"{self.url}: {e}") from None
            if response.status != 200:
                finished = True
                raise http_error(response.status, response.read())
            yield from self._read_events(response)
            finished = True
        finally:
            if not finished:  # left early or failed mid-stream: dropping the connection cancels the request
                conn.close()

    def _read_events(self, response: http.client.HTTPResponse) -> Iterator[Chunk]:
        try:
            for raw in response:
                chunk = chunk_from_sse(raw.decode("utf-8").rstrip("\r\n"))
                if chunk is not None:
                    yield chunk
        except TimeoutError:
            raise Timeout(f"{self.model}: no response within {self.timeout}s") from None
        yield Chunk("", True)  # the stream's end

    def close(self) -> None:
        for connection in self._connections:
            connection.close()
        self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "Completion"]
