"""Running a plan on the replicas: each choice is one gRPC stream to the `llm` model of the replica routing.py
chooses. A choice that fails before its first token (unreachable, or the engine shedding load) is retried once
on another replica; after that its error ends the answer. The choices' chunks are merged into one stream of
(choice index, Chunk)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pagedllm.gateway.errors import OVERLOAD_RETRY_SECONDS, GatewayError, ServiceUnavailableError, from_upstream
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.protocol import Choice, Plan
from pagedllm.gateway.replicas import Replica, ReplicaPool
from pagedllm.gateway.routing import Prompt, RoutingDecision
from pagedllm_client import Chunk, ClientError, Overloaded

Event = tuple[int, Chunk]
_DONE = object()


class Generation:
    def __init__(self, pool: ReplicaPool, plan: Plan, model: str, metrics: GatewayMetrics,
                 lora_name: str | None = None, affinity: str | None = None) -> None:
        self.pool, self.plan, self.model, self.metrics = pool, plan, model, metrics
        self.lora_name, self.affinity = lora_name, affinity if affinity is not None else plan.user
        self.adapter = {"lora_name": lora_name} if lora_name else {}  # sampling_parameters.lora_name
        self.routes: list[RoutingDecision] = []  # where each attempt went and why, for the request log
        self._prompts: dict[tuple[str | None, int], Prompt] = {}  # the n choices of a prompt share its tokens

    @property
    def replicas(self) -> list[str]:
        return [route.replica.url for route in self.routes]

    def events(self) -> AsyncIterator[Event]:
        streams = [self._choice(choice) for choice in self.plan.choices]
        return streams[0] if len(streams) == 1 else merge(streams)

    async def _choice(self, choice: Choice) -> AsyncIterator[Event]:
        tried: Replica | None = None
        tool_use = self.plan.tool_call.tool_use() if self.plan.tool_call else None
        tools = tool_use.request_fields() if tool_use else {}
        prompt = await self._prompt(choice, tool_use)
        for attempt in (1, 2):
            replica = self._pick(tried, prompt)
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

    async def _prompt(self, choice: Choice, tool_use: object) -> Prompt:
        key = (choice.prompt, id(choice.messages))
        if key not in self._prompts:
            self._prompts[key] = await self.pool.router.prompt(self.model, choice.prompt, choice.messages, tool_use,
                                                               self.lora_name, self.affinity)
        return self._prompts[key]

    def _pick(self, tried: Replica | None, prompt: Prompt) -> Replica:
        route = self.pool.pick(self.model, prompt, exclude=tried)
        if route is None and tried is not None and tried.serves(self.model):
            route = self.pool.pick(self.model, prompt)  # the only replica with the model: the retry goes back to it
        if route is None:
            raise ServiceUnavailableError(f"no healthy replica has model {self.model!r} ready; retry shortly",
                                          None, "no_healthy_replica", OVERLOAD_RETRY_SECONDS)
        self.routes.append(route)
        self.metrics.routes.labels(self.model, route.reason.value).inc()
        self.metrics.routed_cached_tokens.labels(self.model).inc(route.cached_tokens)
        return route.replica


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
