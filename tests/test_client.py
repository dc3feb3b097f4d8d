"""The client's pure logic: error classification, retry backoff, the circuit breaker, wire decoding,
the async per-response timeout."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pagedllm_client.aio import next_within
from pagedllm_client.errors import (
    CircuitOpen,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
    Overloaded,
    ServerError,
    Timeout,
    classify,
)
from pagedllm_client.protocol import Completion, chunk_from_sse, http_error, request_fields
from pagedllm_client.resilience import CircuitBreaker, RetryPolicy


@pytest.mark.parametrize("message,status,kind,shown", [
    ("[overloaded] 4 requests waiting; retry later", None, Overloaded, "4 requests waiting; retry later"),
    ("[overloaded] 4 requests waiting", "400", Overloaded, "4 requests waiting"),  # HTTP generate: all 400
    ("[invalid_argument field=sampling_parameters.temperature] -1 is out of range", None, InvalidRequest,
     "sampling_parameters.temperature: -1 is out of range"),
    ("in ensemble 'ensemble', [invalid_argument field=max_tokens] 0 is out of range", "400", InvalidRequest,
     "max_tokens: 0 is out of range"),
    ("[invalid_argument] the prompt is empty", None, InvalidRequest, "the prompt is empty"),
    ("[engine_unavailable] engine restarting: the engine process died; retry shortly", "400", EngineUnavailable,
     "engine restarting: the engine process died; retry shortly"),
    ("[internal] internal error in request 7", "400", ServerError, "internal error in request 7"),
    ("[unknown_code] words", "400", InvalidRequest, "[unknown_code] words"),  # not a code: by the status
    ("max_tokens: 0 is out of range", None, InvalidRequest, None),  # no code, no status: validation
    ("Request for unknown model: 'x' is not found", "StatusCode.NOT_FOUND", InvalidRequest, None),
    ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", Overloaded, None),
    ("model 'llm' is not ready", "400", Overloaded, None),  # Triton's own words: no code
    ("deadline", "StatusCode.DEADLINE_EXCEEDED", Timeout, None),
    ("something", "StatusCode.INTERNAL", ServerError, None),
])
def test_classify(message, status, kind, shown):
    error = classify(message, status)
    assert type(error) is kind and str(error) == (shown or message)
    assert error.code == (ErrorCode(message.split("[")[1].split("]")[0].split(" ")[0])
                          if shown and "[unknown" not in message
                          else None)


def test_only_overload_is_retried_and_backoff_is_jittered_and_capped():
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.5, max_backoff=1.5)
    assert policy.should_retry(Overloaded("x"), 1) and policy.should_retry(Overloaded("x"), 2)
    assert not policy.should_retry(Overloaded("x"), 3)  # attempts used up
    for error in (InvalidRequest("x"), ServerError("x"), Timeout("x"), CircuitOpen("x")):
        assert not policy.should_retry(error, 1)
    assert [policy.backoff(a, rng=lambda: 1.0) for a in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    assert policy.backoff(2, rng=lambda: 0.25) == 0.25
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_circuit_opens_after_failures_half_opens_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=5.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.before_call()
        breaker.record(Overloaded("x"))
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen, match="retry in 5.0s"):
        breaker.before_call()
    now[0] = 5.0
    assert breaker.state == "half-open"
    breaker.before_call()  # the one trial
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # others wait while the trial is out
    breaker.record(None)
    assert breaker.state == "closed" and breaker.failures == 0


def test_failed_trial_reopens_and_invalid_requests_are_not_failures():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0, clock=lambda: now[0])
    breaker.before_call()
    breaker.record(InvalidRequest("x"))
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record(Timeout("x"))
    now[0] = 1.0
    breaker.before_call()
    breaker.record(ServerError("x"))
    assert breaker.state == "open" and breaker.opened_at == 1.0


def test_wire_decoding():
    chunk = chunk_from_sse('data: {"text_output":"Hi","finish_reason":["stop"],"num_output_tokens":3}')
    assert (chunk.text, chunk.final, chunk.finish_reason, chunk.num_output_tokens) == ("Hi", True, "stop", 3)
    assert chunk_from_sse(": keep-alive") is None
    with pytest.raises(Overloaded):
        chunk_from_sse('data: {"error":"[overloaded] full; retry later"}')
    error = http_error(400, b'data: {"error":"max_tokens: 0 is out of range"}\n\n')
    assert isinstance(error, InvalidRequest) and str(error) == "max_tokens: 0 is out of range"
    assert isinstance(http_error(503, b"not json"), Overloaded)
    with pytest.raises(ValueError, match="exactly one"):
        request_fields("a", [{"role": "user", "content": "b"}], {})


def test_completion_accumulates():
    from pagedllm_client.protocol import Chunk
    completion = Completion()
    completion.add(Chunk("", False))
    assert completion.time_to_first_token is None
    completion.add(Chunk("Hel", False, None, 5, 2))
    completion.add(Chunk("lo", True, "length", 5, 1))
    assert (completion.text, completion.finish_reason, completion.num_input_tokens, completion.num_output_tokens) \
        == ("Hello", "length", 5, 3)
    assert completion.chunk_tokens == [2, 1]
    assert completion.time_to_first_token is not None and completion.latency >= completion.time_to_first_token


async def _ticks(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def _drain(items: AsyncIterator[int], timeout: float) -> str:
    try:
        while True:
            await next_within(items, timeout)
    except StopAsyncIteration:
        return "ran to the end"


def test_next_within_never_swallows_a_cancellation():
    # asyncio.wait_for (before 3.12) drops a cancel that lands as an item arrives: most of these would run on.
    async def trials() -> list[str]:
        outcomes = []
        for i in range(300):
            task = asyncio.create_task(_drain(_ticks(50), timeout=5))
            for _ in range(i % 7 + 1):
                await asyncio.sleep(0)
            task.cancel()
            try:
                outcomes.append(await task)
            except asyncio.CancelledError:
                outcomes.append("cancelled")
        return outcomes
    assert set(asyncio.run(trials())) == {"cancelled"}


def test_next_within_times_out_on_a_silent_stream():
    async def silent() -> AsyncIterator[int]:
        await asyncio.sleep(60)
        yield 0
    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(next_within(silent(), timeout=0.05))


def test_retry_none_sends_once_and_breaker_none_never_refuses():
    from pagedllm_client import Client
    from pagedllm_client.resilience import NO_RETRY

    off = Client("localhost:1", retry=None, breaker=None)
    assert off.retry == NO_RETRY and off.breaker is None
    for _ in range(100):  # a breaker would have opened long before
        off._begin_attempt()
        with pytest.raises(Overloaded):
            off._retry_delay(Overloaded("x"), 1, started=False)
    a, b = Client("localhost:1"), Client("localhost:1")
    assert a.retry.max_attempts == 4 and isinstance(a.breaker, CircuitBreaker) and a.breaker is not b.breaker
