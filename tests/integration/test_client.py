"""The client package against a real tritonserver: both protocols, sync and async, early exit aborting
the request on the server, retries on overload, the circuit breaker, invalid requests never retried."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedllm_client import (
    NO_RETRY,
    AsyncClient,
    CircuitBreaker,
    CircuitOpen,
    Client,
    InvalidRequest,
    Overloaded,
    RetryPolicy,
)
from tests.integration.conftest import metric, wait_for

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 400, "ignore_eos": True}


def urls(server) -> dict[str, str]:
    return {"grpc": server.grpc_url, "http": server.http_url}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_and_stream_agree_sync_and_async(server, protocol):
    url = urls(server)[protocol]
    with Client(url, "ensemble", protocol=protocol) as client:
        completion = client.generate(messages=CHAT, temperature=0, max_tokens=24)
        streamed = "".join(client.stream(messages=CHAT, temperature=0, max_tokens=24))

    async def run() -> list:
        async with AsyncClient(url, "ensemble", protocol=protocol) as aclient:
            return await asyncio.gather(*[aclient.generate(messages=CHAT, temperature=0, max_tokens=24)
                                          for _ in range(3)])
    together = asyncio.run(run())
    assert "Paris" in completion.text and completion.finish_reason == "stop"
    assert completion.num_input_tokens > 5 and 0 < completion.num_output_tokens <= 24
    assert 0 < completion.time_to_first_token <= completion.latency
    assert {streamed} | {c.text for c in together} == {completion.text}


def running(server) -> float:
    return metric(server, "pagedllm_num_requests_running", model="llm_tiny")


def generated(server) -> float:
    count = metric(server, "pagedllm_generation_tokens_total", model="llm_tiny")
    return 0.0 if count != count else count  # absent (NaN) before the first token


def idle(server) -> bool:
    return running(server) == 0 and metric(server, "pagedllm_kv_cache_usage_ratio", model="llm_tiny") == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_leaving_a_stream_early_aborts_the_request(server, protocol):
    with Client(urls(server)[protocol], "llm_tiny", protocol=protocol) as client:
        before = generated(server)
        deltas = client.stream("Hello", **LONG)
        for _ in zip(range(3), deltas):
            pass
        deltas.close()
        assert wait_for(lambda: idle(server), timeout=10), "the abandoned request still holds the engine"
        assert generated(server) - before < LONG["max_tokens"] / 2, "the request ran on after the client left"
        assert client.generate("Hello", max_tokens=3).num_output_tokens == 3  # the connection is reusable


def test_cancelling_an_async_task_aborts_the_request(server):
    async def run() -> None:
        async with AsyncClient(server.grpc_url, "llm_tiny") as aclient:
            async def consume() -> None:
                async for _ in aclient.stream("Hello", **LONG):
                    pass
            task = asyncio.create_task(consume())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(run())
    assert wait_for(lambda: idle(server), timeout=10)


def test_a_burst_ten_times_capacity_completes_through_retries(server):
    # llm_tiny admits 4 running + 4 waiting; 40 at once are refused in part and retried with backoff.
    client = Client(server.grpc_url, "llm_tiny", retry=RetryPolicy(max_attempts=60, initial_backoff=0.05,
                                                                    max_backoff=0.5),
                    breaker=CircuitBreaker(failure_threshold=10_000))
    with ThreadPoolExecutor(40) as pool:
        completions = list(pool.map(lambda _: client.generate("Hello", max_tokens=60, ignore_eos=True), range(40)))
    assert all(c.finish_reason == "length" and c.num_output_tokens == 60 for c in completions)
    assert client.attempts > 40, "a burst of 40 against 8 places must have been refused and retried"
    client.close()


def test_invalid_requests_are_never_retried(server):
    for protocol in ("grpc", "http"):
        client = Client(urls(server)[protocol], "llm_tiny", protocol=protocol,
                        breaker=CircuitBreaker(failure_threshold=1))
        with pytest.raises(InvalidRequest, match="temperature"):
            client.generate("Hello", temperature=-1.0)
        assert client.attempts == 1 and client.breaker.state == "closed"


class Saturate:
    """Keeps llm_tiny full (running and waiting) from background threads until stopped."""

    def __init__(self, server, threads: int = 16) -> None:
        self.client = Client(server.grpc_url, "llm_tiny", retry=NO_RETRY, breaker=CircuitBreaker(10_000))
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.generate("Hello", **LONG)
            except Overloaded:
                time.sleep(0.01)

    def __enter__(self) -> Saturate:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
        self.client.close()


def test_circuit_opens_under_overload_and_closes_when_it_passes(server):
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0)
    client = Client(server.grpc_url, "llm_tiny", retry=NO_RETRY, breaker=breaker)
    with Saturate(server):
        assert wait_for(lambda: metric(server, "pagedllm_num_requests_waiting", model="llm_tiny") >= 4, timeout=20)
        for _ in range(200):
            try:
                client.generate("Hello", max_tokens=2)
            except CircuitOpen:
                break
            except Overloaded:
                pass
        assert breaker.state == "open"
        sent = client.attempts
        with pytest.raises(CircuitOpen, match="circuit open"):
            client.generate("Hello", max_tokens=2)
        assert client.attempts == sent, "an open circuit must not send"
    assert wait_for(lambda: idle(server), timeout=60)
    time.sleep(1.0)
    assert breaker.state == "half-open"
    assert client.generate("Hello", max_tokens=2).num_output_tokens == 2
    assert breaker.state == "closed"
