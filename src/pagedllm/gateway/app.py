"""The gateway's HTTP service (FastAPI): OpenAI's chat, completions and responses endpoints, /v1/models,
health, readiness and metrics. A completion request is admitted (admission.py), run on the replicas
(generation.py), folded into its answer (answers.py) and sent whole or as server-sent events (sse.py); however
it ends, accounting.py settles its quota and writes its log line and metrics."""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pagedllm.gateway.accounting import Accounting, RequestRecord
from pagedllm.gateway.adapters import AdapterAdmin
from pagedllm.gateway.admission import Admission, Admitted, Endpoint
from pagedllm.gateway.answers import Answer
from pagedllm.gateway.config import GatewayConfig
from pagedllm.gateway.errors import ClientGoneError, GatewayError, NotFoundError, UpstreamError
from pagedllm.gateway.generation import Event, Generation
from pagedllm.gateway.keys import KeyRing, load_keys
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.quotas import KeyQuota
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.gateway.responses_api import ResponseStore
from pagedllm.gateway.sse import fold, internal_error, write_events

logger = logging.getLogger("pagedllm.gateway")
DISCONNECT_POLL_SECONDS = 0.5  # how often a non-streamed request checks that its client is still there
SESSION_HEADER = "x-session-id"  # keeps a session's requests on one replica when routing finds them equal


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.pool = ReplicaPool(config.triton, config.models, config.health_interval, config.upstream_timeout,
                                config.triton_dns, routing=config.routing)
        self.keys = KeyRing(load_keys(config.api_keys) if config.api_keys else None)
        self.quotas = {key.name: KeyQuota(key.limits) for key in self.keys.keys or []}
        self.metrics = GatewayMetrics(self.pool)
        self.accounting = Accounting(self.metrics)
        self.admission = Admission(config, self.pool, self.keys, self.quotas,
                                   ResponseStore(config.responses_stored, config.responses_kept_seconds))
        self.adapters = AdapterAdmin(config, self.pool, self.keys)

    async def change_adapters(self, request: Request, action: str) -> Response:
        """POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's plain-text answer, or the error."""
        try:
            text = await (self.adapters.load(request) if action == "load" else self.adapters.unload(request))
        except GatewayError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        logger.info("LoRA adapter %s: %s", action, text)
        return PlainTextResponse(text)

    # ---- the completion endpoints -------------------------------------------------------------
    async def complete(self, endpoint: Endpoint, request: Request) -> Response:
        record = RequestRecord("req_" + uuid.uuid4().hex)
        admitted: Admitted | None = None
        try:
            admitted = await self.admission.admit(endpoint, request, record)
            answer = admitted.answer
            generation = Generation(self.pool, answer.plan, admitted.model, self.metrics, admitted.route.lora_name,
                                    request.headers.get(SESSION_HEADER))
            events = generation.events()
            first = await self._first(events, generation, record)  # an error before any token: an HTTP error
            if answer.plan.stream:
                def finish(status: int, error: GatewayError | None) -> None:
                    self.accounting.finish(record, admitted.ticket, answer, status, error)
                body = write_events(answer, first, events, record, finish)
                return StreamingResponse(body, media_type="text/event-stream", headers=self._headers(record, admitted))
            fold(answer, first, record)
            if not await self._collect(answer, events, record, request):
                return self._error(ClientGoneError("the client left before the answer was ready", None,
                                                   "client_disconnected"), record, admitted)
            self.accounting.finish(record, admitted.ticket, answer, 200)
            return JSONResponse(answer.whole(), headers=self._headers(record, admitted))
        except GatewayError as e:
            return self._error(e, record, admitted)
        except Exception as e:  # a bug of ours: a 500 that says so, and the gateway keeps serving
            logger.exception("request %s failed", record.request_id)
            return self._error(internal_error(e), record, admitted)

    async def _first(self, events: AsyncIterator[Event], generation: Generation, record: RequestRecord) -> Event:
        try:
            return await events.__anext__()
        except StopAsyncIteration:
            raise UpstreamError("the server ended the stream without a response") from None
        finally:
            record.replica = ",".join(dict.fromkeys(generation.replicas)) or None
            record.routing = generation.routes[0].log() if generation.routes else None

    async def _collect(self, answer: Answer, events: AsyncIterator[Event], record: RequestRecord,
                       request: Request) -> bool:
        """The rest of a non-streamed answer; False if the client left first (its engine requests are
        cancelled then, as a stream's are: nothing generates for nobody)."""
        async def rest() -> None:
            async for event in events:
                fold(answer, event, record)
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

    def _headers(self, record: RequestRecord, admitted: Admitted) -> dict[str, str]:
        quota = self.quotas.get(admitted.key.name)
        return {"x-request-id": record.request_id} | (quota.headers() if quota else {})

    def _error(self, error: GatewayError, record: RequestRecord, admitted: Admitted | None) -> Response:
        ticket, answer = (admitted.ticket, admitted.answer) if admitted else (None, None)
        self.accounting.finish(record, ticket, answer, error.status, error)
        return JSONResponse(error.body(), status_code=error.status,
                            headers=error.headers() | {"x-request-id": record.request_id})

    # ---- the other endpoints ------------------------------------------------------------------
    def list_models(self, request: Request) -> Response:
        try:
            key = self.keys.authenticate(request.headers.get("authorization"))
        except GatewayError as e:
            return JSONResponse(e.body(), status_code=e.status)
        served, config = self.pool.models(), self.config
        names = sorted(served) + sorted(a for a, m in config.served_model_names.items() if m in served)
        names += sorted(a for a, m in config.lora_adapters.items() if m in served)
        allowed = [n for n in names if key.models is None or n in key.models
                   or (n not in config.lora_adapters and config.route(n).model in key.models)]
        routes = {n: config.route(n) for n in allowed}
        lengths = {n: config.max_model_len.get(routes[n].model) for n in allowed}
        return JSONResponse({"object": "list", "data": [  # an adapter's parent is its base model, as vLLM lists it
            {"id": n, "object": "model", "created": 0, "owned_by": "pagedllm"}
            | ({"parent": routes[n].model} if routes[n].lora_name else {})
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

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        return await gateway.change_adapters(request, "load")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        return await gateway.change_adapters(request, "unload")

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
