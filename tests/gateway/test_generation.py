"""Generation's pieces that need no server: merging the choices' streams (the first error cancels the
rest) and the choice of replica for an attempt and its retry."""
from __future__ import annotations

import asyncio

import pytest

from pagedllm.gateway.errors import GatewayError, ServiceUnavailableError
from pagedllm.gateway.generation import Generation, merge
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.protocol import parse
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.gateway.routing import Prompt
from tests.gateway.bodies import CHAT

NO_PROMPT = Prompt(None)


def test_merge_interleaves_streams_and_the_first_error_cancels_the_others():
    cancelled = []

    async def steady(index: int, n: int):
        try:
            for i in range(n):
                yield index, i
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise

    async def failing():
        yield 2, 0
        raise ServiceUnavailableError("engine down", None, "overloaded")

    async def run(streams) -> list:
        return [event async for event in merge(streams)]
    events = asyncio.run(run([steady(0, 3), steady(1, 3)]))
    assert sorted(events) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    async def run_failing() -> list:
        seen = []
        with pytest.raises(GatewayError, match="engine down"):
            async for event in merge([steady(0, 1000), failing()]):
                seen.append(event)
        return seen
    seen = asyncio.run(run_failing())
    assert (2, 0) in seen and cancelled == [0]


def pool(*serving: set[str]) -> ReplicaPool:
    replicas = ReplicaPool([f"r{i}:1" for i in range(len(serving))], ["llm"])
    for replica, models in zip(replicas.replicas, serving):
        replica.healthy, replica.models = bool(models), models
    return replicas


def test_a_retry_goes_elsewhere_or_back_to_the_only_replica_with_the_model():
    plan = parse("chat", CHAT)
    two = Generation(pool({"llm"}, {"llm"}), plan, "llm", GatewayMetrics(pool()))
    first = two._pick(None, NO_PROMPT)
    assert two._pick(first, NO_PROMPT) is not first and sorted(two.replicas) == ["r0:1", "r1:1"]
    one = Generation(pool({"llm"}, {"other"}), plan, "llm", GatewayMetrics(pool()))
    only = one._pick(None, NO_PROMPT)
    assert one._pick(only, NO_PROMPT) is only
    with pytest.raises(ServiceUnavailableError) as e:
        Generation(pool({"other"}), plan, "llm", GatewayMetrics(pool()))._pick(None, NO_PROMPT)
    assert e.value.status == 503 and e.value.retry_after is not None
