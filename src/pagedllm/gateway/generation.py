"""Running a plan on the replicas: each choice is one gRPC stream to the `llm` model of the replica with
the fewest outstanding requests. A choice that fails before its first token (unreachable, or the engine
shedding load) is retried once on another replica; after that its error ends the answer. The choices'
chunks are merged into one stream of (choice index, Chunk)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pagedllm.gateway.errors import OVERLOAD_RETRY_SECONDS, GatewayError, ServiceUnavailableError, from_upstream
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.protocol import Choice, Plan
from pagedllm.gateway.replicas import Replica, ReplicaPool
from pagedllm_client import Chunk, ClientError, Overloaded

Event = tuple[int, Chunk]
_DONE = object()


class Generation:
    def __init__(self, pool: ReplicaPool, plan: Plan, model: str, metrics: GatewayMetrics,
                 lora_name: str | None = None) -> None:
        self.pool, self.plan, self.model, self.metrics = pool, plan, model, metrics
        self.adapter = {"lora_name": lora_name} if lora_name else {}  # sampling_parameters.lora_name
        self.replicas: list[str] = []  # where each attempt went, for the request log

    def events(self) -> AsyncIterator[Event]:
        streams = [self._choice(choice) for choice in self.plan.choices]
        return streams[0] if len(streams) == 1 else merge(streams)

    async def _choice(self, choice: Choice) -> AsyncIterator[Event]:
        tried: Replica | None = None
        tools = self.plan.tool_call.tool_use().request_fields() if self.plan.tool_call else {}
        for attempt in (1, 2):
            replica = self._pick(tried)
            started = False
            replica.outstanding += 1
            try:
                async for chunk in replica.client(self.model).chunks(choice.prompt, choice.messages, **tools,
                                                                     **choice.sampling, **self.adapter):
                    started = True
                    yield choice.index, chunk
                return
            except Overloaded as e:
                replica.failed(e, self.model)
                if started or attempt == 2:
                    raise from_upstream(e) from None
                tried = replica
                self.metrics.retries.inc()
            except ClientError as e:
                raise from_upstream(e, self.plan.renamed) from None
            finally:
                replica.outstanding -= 1

    def _pick(self, tried: Replica | None) -> Replica:
        replica = self.pool.pick(self.model, exclude=tried)
        if replica is None and tried is not None and tried.serves(self.model):
            replica = tried  # the only replica with the model: the retry goes back to it
        if replica is None:
            raise ServiceUnavailableError(f"no healthy replica has model {self.model!r} ready; retry shortly",
                                          None, "no_healthy_replica", OVERLOAD_RETRY_SECONDS)
        self.replicas.append(replica.url)
        return replica


async def merge(streams: list[AsyncIterator[Event]]) -> AsyncIterator[Event]:
    """Every stream's events as they come. The first error cancels the other streams and is raised; so
    does leaving early (their gRPC streams are cancelled, freeing the engine's blocks)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(stream: AsyncIterator[Event]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
            await queue.put(_DONE)
        except GatewayError as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, GatewayError):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
