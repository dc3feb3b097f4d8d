"""AsyncClient: the same contract as Client for asyncio services (gRPC via tritonclient's aio client,
HTTP via aiohttp). Leaving a stream early, or cancelling the task, cancels the request on the server."""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
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

T = TypeVar("T")


async def next_within(iterator: AsyncIterator[T], timeout: float) -> T:
    """The iterator's next item, or TimeoutError after `timeout` seconds. asyncio.timeout cancels this task
    itself at the deadline: no task and no asyncio.wait per item (they cost perf/loadgen.py 0.108 against
    0.092 CPU-seconds per 1,000 tokens streamed one by one); nor asyncio.wait_for, which before Python 3.12
    returns the item, swallowing the cancellation, when a task is cancelled just as the item arrives (a
    cancelled stream then runs to its end)."""
    async with asyncio.timeout(timeout):
        return await iterator.__anext__()


async def end_stream(responses: Any, finished: bool, grace: float = 5.0) -> None:
    """Leaving a stream early cancels its request. A finished stream is read to its end instead: on Triton
    2.51, cancelling a gRPC stream whose request has completed can leak the model version under load (it
    never finishes unloading, and shutdown runs into --exit-timeout-secs). See docs/RELIABILITY.md."""
    if finished:
        with contextlib.suppress(Exception):  # StopAsyncIteration once the server has ended the call
            await next_within(responses, grace)
    responses.cancel()  # does nothing once the call has ended


class AsyncClient(ClientSettings):
    """Client's constructor and contract, for asyncio."""

    def _init_transport(self) -> None:
        self._grpc: Any = None
        self._session: Any = None
        self._batched: bool | None = None  # the model has max_batch_size > 0: inputs get a batch dimension

    async def generate(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                       **sampling: Any) -> Completion:
        completion = Completion()
        async for chunk in self._chunks(request_fields(prompt, messages, sampling)):
            completion.add(chunk)
        return completion

    async def stream(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                     **sampling: Any) -> AsyncIterator[str]:
        async for chunk in self._chunks(request_fields(prompt, messages, sampling)):
            if chunk.text:
                yield chunk.text

    async def chunks(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                     **sampling: Any) -> AsyncIterator[Chunk]:
        """Every response as a Chunk: its text, and the finish reason, token counts and (when `logprobs` is
        given) logprobs the server sends with it."""
        async for chunk in self._chunks(request_fields(prompt, messages, sampling)):
            yield chunk

    async def _chunks(self, fields: dict[str, Any]) -> AsyncIterator[Chunk]:
        attempt = 0
        while True:
            attempt += 1
            self._begin_attempt()
            started = False
            chunks = self._send(fields)
            try:
                async for chunk in chunks:
                    started = True
                    yield chunk
            except ClientError as error:
                await asyncio.sleep(self._retry_delay(error, attempt, started))
                continue
            except (GeneratorExit, asyncio.CancelledError):
                self._record(None)
                raise
            finally:
                await chunks.aclose()
            self._record(None)
            return

    async def change_adapter(self, action: str, lora_name: str, lora_path: str | None = None,
                             pinned: bool = False) -> None:
        """Load ("load", from `lora_path`, a folder inside the model's engine.json lora_dir; `pinned`: it keeps its
        slot) or unload ("unload") a LoRA adapter on this server's llm model while it runs; ClientError (naming the
        field) if refused."""
        control = {"action": action, "lora_name": lora_name} | ({"lora_path": lora_path} if lora_path else {})
        control |= {"pinned": True} if pinned else {}
        async for _ in self._send({"stream": True, "lora_control": json.dumps(control)}):
            pass

    async def cache_state(self, epoch: str | None = None, since: int = 0) -> str:
        """Which prefix blocks the llm model's engine holds, and its load, as JSON (pagedllm's kv_events.CacheState):
        what changed since `since` within `epoch`, or all of it. For routers; ClientError if refused."""
        text = ""
        async for chunk in self._send({"cache_state": json.dumps({"epoch": epoch, "since": since})}):
            text += chunk.text
        return text

    def _send(self, fields: dict[str, Any]) -> AsyncIterator[Chunk]:
        return self._send_grpc(fields) if self.protocol == "grpc" else self._send_http(fields)

    async def _send_grpc(self, fields: dict[str, Any]) -> AsyncIterator[Chunk]:
        if self._grpc is None:
            import tritonclient.grpc.aio as grpcaio
            self._grpc = grpcaio.InferenceServerClient(self.url)

        if self._batched is None:
            try:
                config = await self._grpc.get_model_config(self.model, self.model_version, as_json=True)
            except InferenceServerException as e:
                raise from_triton(e) from None
            self._batched = int(config["config"].get("max_batch_size", 0)) > 0
        inputs = grpc_inputs(fields, self._batched)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs, "model_version": self.model_version}

        responses = self._grpc.stream_infer(one_request())
        finished = False
        try:
            while not finished:
                try:
                    result, error = await next_within(responses, self.timeout)
                except TimeoutError:
                    raise Timeout(f"{self.model}: no response within {self.timeout}s") from None
                except StopAsyncIteration:
                    finished = True
                    return
                if error is not None:
                    finished = True  # an error response is the request's last
                    raise from_triton(error)
                chunk = chunk_from_grpc(result)
                chunk.final = finished = chunk.final or chunk.finish_reason is not None
                yield chunk
        except (InferenceServerException, grpc.RpcError) as e:  # the latter: the connection broke mid-stream
            raise from_triton(e) from None
        finally:
            await end_stream(responses, finished)

    async def _send_http(self, fields: dict[str, Any]) -> AsyncIterator[Chunk]:
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=self.timeout))
        version = f"/versions/{self.model_version}" if self.model_version else ""
        url = f"http://{self.url}/v2/models/{self.model}{version}/generate_stream"
        try:
            async with self._session.post(url, data=json.dumps(fields),
                                          headers={"Content-Type": "application/json"}) as response:
                if response.status != 200:
                    raise http_error(response.status, await response.read())
                async for raw in response.content:  # closing early drops the connection: cancelled
                    chunk = chunk_from_sse(raw.decode("utf-8").rstrip("\r\n"))
                    if chunk is not None:
                        yield chunk
        except TimeoutError:
            raise Timeout(f"{self.model}: no response within {self.timeout}s") from None
        except aiohttp.ClientConnectionError as e:
            raise Overloaded(f"{self.url}: {e}") from None
        yield Chunk("", True)

    async def close(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
        if self._session is not None:
            await self._session.close()
        self._grpc = self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
