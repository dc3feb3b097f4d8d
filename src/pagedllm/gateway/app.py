"""The gateway's HTTP service (FastAPI): OpenAI's chat and completions endpoints, /v1/models, health,
readiness and metrics. A request is authenticated, parsed, admitted by its key's quota, then run on the
replicas (generation.py); every request ends in one JSON log line and the metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pagedllm.gateway.answers import Answer
from pagedllm.gateway.config import GatewayConfig
from pagedllm.gateway.errors import (
    ClientGoneError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UpstreamError,
)
from pagedllm.gateway.generation import Event, Generation
from pagedllm.gateway.keys import ApiKey, KeyRing, load_keys
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.protocol import Plan, decode_body, parse
from pagedllm.gateway.quotas import KeyQuota, Ticket, estimate_tokens
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.gateway.responses_api import ResponseStore
from pagedllm.gateway.responses_api import parse_request as parse_response_request
from pagedllm.tool_format import chat_bytes

logger = logging.getLogger("pagedllm.gateway")
access_log = logging.getLogger("pagedllm.gateway.access")
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there
DRAIN_FACTOR = 16  # a body over the limit is read (and dropped) up to this many times the limit, then cut


@dataclass
class RequestRecord:
    """The request's log line: never the prompt or the output."""
    request_id: str
    key: str = "-"
    model: str | None = None
    replica: str | None = None
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    duration: float = 0.0
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None
    error_detail: str | None = None  # what the server said of a 5xx it failed (never the prompt)
    started: float = field(default_factory=time.monotonic, repr=False)


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pool = ReplicaPool(config.triton, config.models, config.health_interval, config.upstream_timeout,
                                config.triton_dns)
        self.keys = KeyRing(load_keys(config.api_keys) if config.api_keys else None)
        self.quotas = {key.name: KeyQuota(key.limits) for key in self.keys.keys or []}
        self.metrics = GatewayMetrics(self.pool)
        self.responses = ResponseStore(config.responses_stored, config.responses_kept_seconds)

    # ---- the completion endpoints -------------------------------------------------------------
    async def complete(self, kind: Literal["chat", "completion", "responses"], request: Request) -> Response:
        record = RequestRecord("req_" + uuid.uuid4().hex)
        ticket: Ticket | None = None
        answer: Answer | None = None
        try:
            key = self.keys.authenticate(request.headers.get("authorization"))
            record.key = key.name
            body = decode_body(await self._body(request))
            if kind == "responses":
                answer = parse_response_request(body, self.responses, key.name)
            else:
                answer = Answer(parse(kind, body))
            plan = answer.plan
            record.model = self._model(plan.model, key)
            ticket = self._admit(key, plan, record.model)
            generation = Generation(self.pool, plan, record.model, self.metrics)
            events = generation.events()
            first = await self._first(events, generation, record)  # an error before any token: an HTTP error
            if plan.stream:
                body = self._sse(answer, first, events, record, ticket)
                return StreamingResponse(body, media_type="text/event-stream", headers=self._headers(record, key))
            self._add(answer, *first, record)
            if not await self._collect(answer, events, record, request):
                return self._error(ClientGoneError("the client left before the answer was ready", None,
                                                   "client_disconnected"), record, ticket, answer)
            return self._json(answer.whole(), record, ticket, answer, key)
        except GatewayError as e:
            return self._error(e, record, ticket, answer)
        except Exception as e:  # a bug of ours: a 500 that says so, and the gateway keeps serving
            logger.exception("request %s failed", record.request_id)
            return self._error(UpstreamError(f"internal gateway error ({type(e).__name__})"), record, ticket, answer)

    async def _first(self, events: AsyncIterator[Event], generation: Generation, record: RequestRecord) -> Event:
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            raise UpstreamError("the server ended the stream without a response") from None
        finally:
            record.replica = ",".join(dict.fromkeys(generation.replicas)) or None

    async def _collect(self, answer: Answer, events: AsyncIterator[Event], record: RequestRecord,
                       request: Request) -> bool:
        """The rest of a non-streamed answer; False if the client left first (its engine requests are
        cancelled then, as a stream's are: nothing generates for nobody)."""
        async def rest() -> None:
            async for index, chunk in events:
                self._add(answer, index, chunk, record)
        task = asyncio.ensure_future(rest())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                record.cancelled = True
                return False
        task.result()
        return True

    async def _sse(self, answer: Answer, first: Event, events: AsyncIterator[Event], record: RequestRecord,
                   ticket: Ticket | None) -> AsyncIterator[bytes]:
        error: GatewayError | None = None
        try:
            for chunk in answer.opening_chunks():
                yield answer.encode(chunk)
            event: Event | None = first
            while event is not None:
                for chunk in self._add(answer, *event, record):
                    yield answer.encode(chunk)
                event = await anext(events, None)
            for chunk in answer.closing_chunks():
                yield answer.encode(chunk)
        except Exception as e:  # after streaming began: an error event, and the stream ends
            if not isinstance(e, GatewayError):
                logger.exception("request %s failed", record.request_id)
            error = e if isinstance(e, GatewayError) else UpstreamError(f"internal gateway error ({type(e).__name__})")
            yield answer.encode(answer.error_event(error.body()))
        except BaseException:  # the client left: the engine requests are cancelled as the streams close
            record.cancelled = True
            raise
        finally:
            await events.aclose()
            self._finish(record, ticket, answer, error.status if error else 200, error)

    def _add(self, answer: Answer, index: int, chunk, record: RequestRecord) -> list[dict]:
        """Fold one engine response into the answer; the stream chunks it makes, if it says anything."""
        out = answer.outputs[index]
        out.text += chunk.text
        out.completion_tokens += chunk.num_output_tokens or 0
        out.prompt_tokens = chunk.num_input_tokens or out.prompt_tokens
        out.logprobs += chunk.logprobs or []
        out.finish_reason = chunk.finish_reason or out.finish_reason
        if chunk.text and record.time_to_first_token is None:
            record.time_to_first_token = time.monotonic() - record.started
        if not (chunk.text or chunk.logprobs or chunk.finish_reason):
            return []
        return answer.chunks(index, chunk.text, chunk.logprobs or [], chunk.finish_reason)

    # ---- admission ----------------------------------------------------------------------------
    async def _body(self, request: Request) -> bytes:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise InvalidRequestError(f"Content-Type: expected application/json, got {content_type or 'none'!r}",
                                      None, "unsupported_content_type")
        limit, body, size = self.config.max_body_bytes, bytearray(), 0
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

    def _model(self, name: str, key: ApiKey) -> str:
        model = self.config.served_model_names.get(name, name)
        if not any(r.healthy for r in self.pool.replicas):
            raise ServiceUnavailableError("no healthy replica; retry shortly", None, "no_healthy_replica", 1.0)
        if model not in self.pool.models():
            raise NotFoundError(f"model: {name!r} does not exist; GET /v1/models lists the models served",
                                "model", "model_not_found")
        if key.models is not None and name not in key.models:
            key.check_model(model)
        return model

    def _admit(self, key: ApiKey, plan: Plan, model: str) -> Ticket | None:
        quota = self.quotas.get(key.name)
        if quota is None:
            return None
        prompts = [estimate_tokens(_prompt_bytes(c.prompt, c.messages)) for c in plan.choices]
        if plan.max_tokens is not None:
            return quota.admit(sum(prompts) + plan.max_tokens * len(prompts))
        # each choice may run to the end of the context; a full bucket still admits such a request
        context = self.config.context_length(model)
        return quota.admit(sum(prompts), up_to=sum(max(p, context) for p in prompts))

    # ---- endings ------------------------------------------------------------------------------
    def _headers(self, record: RequestRecord, key: ApiKey | None = None) -> dict[str, str]:
        quota = self.quotas.get(key.name) if key else None
        return {"x-request-id": record.request_id} | (quota.headers() if quota else {})

    def _json(self, body: dict, record: RequestRecord, ticket: Ticket | None, answer: Answer,
              key: ApiKey) -> Response:
        self._finish(record, ticket, answer, 200)
        return JSONResponse(body, headers=self._headers(record, key))

    def _error(self, error: GatewayError, record: RequestRecord, ticket: Ticket | None,
               answer: Answer | None) -> Response:
        self._finish(record, ticket, answer, error.status, error)
        return JSONResponse(error.body(), status_code=error.status,
                            headers=error.headers() | {"x-request-id": record.request_id})

    def _finish(self, record: RequestRecord, ticket: Ticket | None, answer: Answer | None, status: int,
                error: GatewayError | None = None) -> None:
        record.status, record.duration = status, time.monotonic() - record.started
        if answer is not None:
            usage = answer.usage()
            record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            reasons = {out.finish_reason for out in answer.outputs if out.finish_reason}
            record.finish_reason = ",".join(sorted(reasons)) or None
        if ticket is not None:
            ticket.settle(record.prompt_tokens + record.completion_tokens)
        if error is not None:
            record.error = error.code or type(error).__name__
            record.error_detail = getattr(error, "detail", None)
            if status in (401, 403, 413, 429, 503):
                self.metrics.rejections.labels(record.error).inc()
        self._observe(record)
        access_log.info(json.dumps({k: v for k, v in asdict(record).items() if k != "started"}))

    def _observe(self, record: RequestRecord) -> None:
        m, model = self.metrics, record.model or "-"
        m.requests.labels(record.key, model, str(record.status)).inc()
        m.tokens.labels(record.key, "prompt").inc(record.prompt_tokens)
        m.tokens.labels(record.key, "completion").inc(record.completion_tokens)
        if record.status == 200 and not record.cancelled:
            m.e2e.labels(model).observe(record.duration)
            if record.time_to_first_token is not None:
                m.ttft.labels(model).observe(record.time_to_first_token)

    # ---- the other endpoints ------------------------------------------------------------------
    def list_models(self, request: Request) -> Response:
        try:
            key = self.keys.authenticate(request.headers.get("authorization"))
        except GatewayError as e:
            return JSONResponse(e.body(), status_code=e.status)
        served = self.pool.models()
        names = sorted(served) + sorted(a for a, m in self.config.served_model_names.items() if m in served)
        allowed = [n for n in names if key.models is None or n in key.models
                   or self.config.served_model_names.get(n, n) in key.models]
        lengths = {n: self.config.max_model_len.get(self.config.served_model_names.get(n, n)) for n in allowed}
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "pagedllm"}
            | ({"max_model_len": lengths[n]} if lengths[n] else {}) for n in allowed]})

    def render_metrics(self, request: Request) -> Response:
        """Key names, usage and replica addresses: with --api-keys, for scrape keys only."""
        try:
            self.keys.authenticate(request.headers.get("authorization")).check_metrics()
        except GatewayError as e:
            self.metrics.rejections.labels(e.code or type(e).__name__).inc()
            return JSONResponse(e.body(), status_code=e.status)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def ready(self) -> Response:
        models = sorted(self.pool.models())
        return JSONResponse({"ready": bool(models), "models": models}, status_code=200 if models else 503)


def _prompt_bytes(prompt: str | None, messages: list[dict[str, Any]] | None) -> int:
    return len(prompt.encode("utf-8")) if prompt is not None else chat_bytes(messages or [])


def create_app(config: GatewayConfig) -> FastAPI:
    gateway = Gateway(config)
    if gateway.keys.keys is None:
        logger.warning("no --api-keys: the gateway is open to anyone who can reach %s:%d", config.host, config.port)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.pool.start()
        yield
        await gateway.pool.close()

    app = FastAPI(title="pagedllm gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.complete("chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.complete("completion", request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await gateway.complete("responses", request)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return gateway.list_models(request)

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        return gateway.ready()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return gateway.render_metrics(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        error = NotFoundError(f"{request.method} {request.url.path}: {exc.detail}", None, "not_found")
        return JSONResponse(error.body(), status_code=exc.status_code)

    return app
