"""Everything a request passes before any replica sees it: its API key, a bounded JSON body, the request
parsed into a plan, its model (served names resolved, the key's model list applied, a healthy replica
needed) and its key's quota."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request

from pagedllm.gateway.accounting import RequestRecord
from pagedllm.gateway.answers import Answer
from pagedllm.gateway.config import GatewayConfig, Route
from pagedllm.gateway.errors import InvalidRequestError, NotFoundError, RequestTooLargeError, ServiceUnavailableError
from pagedllm.gateway.keys import ApiKey, KeyRing
from pagedllm.gateway.protocol import Plan, decode_body, parse
from pagedllm.gateway.quotas import KeyQuota, Ticket, estimate_tokens
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.gateway.responses_api import ResponseStore
from pagedllm.gateway.responses_api import parse_request as parse_response_request
from pagedllm.tool_format import chat_bytes

Endpoint = Literal["chat", "completion", "responses"]
DRAIN_FACTOR = 16  # a body over the limit is read (and dropped) up to this many times the limit, then cut


@dataclass
class Admitted:
    """A request let through: who sent it, the answer it will get, the model (and adapter) that runs it, its quota
    ticket."""
    key: ApiKey
    answer: Answer
    route: Route
    ticket: Ticket | None

    @property
    def model(self) -> str:
        return self.route.model


class Admission:
    def __init__(self, config: GatewayConfig, pool: ReplicaPool, keys: KeyRing, quotas: dict[str, KeyQuota],
                 responses: ResponseStore) -> None:
        self.config, self.pool, self.keys, self.quotas, self.responses = config, pool, keys, quotas, responses

    async def admit(self, endpoint: Endpoint, request: Request, record: RequestRecord) -> Admitted:
        """The admitted request, or the GatewayError that refuses it; `record` learns the key and model."""
        key = self.keys.authenticate(request.headers.get("authorization"))
        record.key = key.name
        body = decode_body(await read_body(request, self.config.max_body_bytes))
        if endpoint == "responses":
            answer = parse_response_request(body, self.responses, key.name)
        else:
            answer = Answer(parse(endpoint, body))
        route = self.route(answer.plan.model, key)
        record.model, record.adapter = route
        return Admitted(key, answer, route, self.reserve(key, answer.plan, route.model))

    def route(self, name: str, key: ApiKey) -> Route:
        """The served model (and adapter) `name` stands for, if it is served and `key` may use it. A key's list
        names an adapter itself: its base model's name does not grant it."""
        route = self.config.route(name)
        model = route.model
        if not any(r.healthy for r in self.pool.replicas):
            raise ServiceUnavailableError("no healthy replica; retry shortly", None, "no_healthy_replica", 1.0)
        if model not in self.pool.models():
            raise NotFoundError(f"model: {name!r} does not exist; GET /v1/models lists the models served",
                                "model", "model_not_found")
        if key.models is not None and name not in key.models:
            key.check_model(name if route.lora_name else model)
        return route

    def reserve(self, key: ApiKey, plan: Plan, model: str) -> Ticket | None:
        """The key's tokens for this plan taken from its quota (settled with the real count at the end)."""
        quota = self.quotas.get(key.name)
        if quota is None:
            return None
        prompts = [estimate_tokens(_prompt_bytes(c.prompt, c.messages)) for c in plan.choices]
        if plan.max_tokens is not None:
            return quota.admit(sum(prompts) + plan.max_tokens * len(prompts))
        # each choice may run to the end of the context; a full bucket still admits such a request
        context = self.config.context_length(model)
        return quota.admit(sum(prompts), up_to=sum(max(p, context) for p in prompts))


async def read_body(request: Request, limit: int) -> bytes:
    """The JSON body, at most `limit` bytes (a larger one is a 413, read no further than needed to say so)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise InvalidRequestError(f"Content-Type: expected application/json, got {content_type or 'none'!r}",
                                  None, "unsupported_content_type")
    body, size = bytearray(), 0
    async for part in request.stream():
        size += len(part)
        if size <= limit:
            body += part
        elif size > limit * DRAIN_FACTOR:
            break
    if size > limit:
        raise RequestTooLargeError(f"the request body is over the gateway's limit of {limit} bytes", None,
                                   "request_too_large")
    return bytes(body)


def _prompt_bytes(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    return len(prompt.encode("utf-8")) if prompt is not None else chat_bytes(messages or [])
