"""The tritonservers behind the gateway: health checks every few seconds (server ready, and which of the
configured LLM models are ready), ejection and re-admission, and the choice of replica for each request among the
healthy ones with the model ready, by routing.py's Router (which polls each replica's prefix cache)."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedllm.gateway.config import GatewayConfig, RoutingConfig
from pagedllm.gateway.routing import PrefixIndex, Prompt, Router, RoutingDecision
from pagedllm_client import AsyncClient
from pagedllm_client.errors import EngineUnavailable

logger = logging.getLogger("pagedllm.gateway")
_UNREACHABLE = ("failed to connect", "connection refused", "socket closed", "connect failed")
ENGINE_COOLDOWN_SECONDS = 3.0  # an engine restart takes about 7 s; a refusal after the cool-down re-arms it


def is_llm_model(config: dict[str, Any]) -> bool:
    """The models the gateway serves: decoupled Python-backend models speaking the vLLM-backend contract."""
    inputs = {i["name"] for i in config.get("input", [])}
    decoupled = config.get("model_transaction_policy", {}).get("decoupled", False)
    return decoupled and config.get("backend") == "python" and {"messages", "sampling_parameters"} <= inputs


def llm_models_in(repository: Path) -> list[str]:
    """The LLM models of a local model repository, from their config.pbtxt (what `pagedllm serve` gives its
    gateway to serve)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    names = []
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if is_llm_model(json_format.MessageToDict(config, preserving_proto_field_name=True)):
            names.append(config.name or path.parent.name)
    return names


@dataclass
class Replica:
    url: str
    upstream_timeout: float = GatewayConfig.upstream_timeout
    healthy: bool = False
    outstanding: int = 0
    models: set[str] = field(default_factory=set)  # the LLM models ready on it
    cooling: dict[str, float] = field(default_factory=dict)  # model -> monotonic time its cool-down ends
    _kinds: dict[str, bool] = field(default_factory=dict)  # model name -> is an LLM model (from its config)
    _clients: dict[str, AsyncClient] = field(default_factory=dict)
    _admin: Any = None
    _prefix: dict[str, PrefixIndex] = field(default_factory=dict)  # model -> its engine's prefix blocks

    def prefix_index(self, model: str) -> PrefixIndex:
        if model not in self._prefix:
            self._prefix[model] = PrefixIndex()
        return self._prefix[model]

    def client(self, model: str) -> AsyncClient:
        """One client per model (it learns the model's batching once); retries are the gateway's to make."""
        if model not in self._clients:
            self._clients[model] = AsyncClient(self.url, model, timeout=self.upstream_timeout, retry=None,
                                               breaker=None)
        return self._clients[model]

    async def check(self, names: list[str], timeout: float = 2.0) -> None:
        """Server ready, and which of `names` are ready LLM models: readiness and config only, which a
        server keeps open when its admin groups (the repository index among them) need a key."""
        import tritonclient.grpc.aio as grpcaio
        if self._admin is None:
            self._admin = grpcaio.InferenceServerClient(self.url)
        try:
            ready = await self._admin.is_server_ready(client_timeout=timeout)
            models = set()
            for name in names:
                if not await _model_ready(self._admin, name, timeout):
                    continue
                if name not in self._kinds:
                    config = await self._admin.get_model_config(name, as_json=True, client_timeout=timeout)
                    self._kinds[name] = is_llm_model(config["config"])
                    if not self._kinds[name]:
                        logger.warning("replica %s: %s is not an LLM model (decoupled Python backend taking "
                                       "messages and sampling_parameters); not served", self.url, name)
                if self._kinds[name]:
                    models.add(name)
        except Exception as e:  # noqa: BLE001 (unreachable, or answering errors: ejected until a check passes)
            ready, models = False, set()
            logger.debug("replica %s failed its health check: %s", self.url, e)
        self._set(bool(ready) and bool(models), models)

    def _set(self, healthy: bool, models: set[str]) -> None:
        if healthy != self.healthy:
            logger.warning("replica %s %s", self.url, "admitted" if healthy else "ejected (failed health check)")
        self.healthy, self.models = healthy, models

    def failed(self, error: Exception, model: str) -> None:
        """A request could not reach it: ejected at once, re-admitted by the next passing check. Its engine
        for `model` is down: that model is skipped here until the cool-down ends."""
        text = str(error).lower()
        if any(mark in text for mark in _UNREACHABLE) and self.healthy:
            logger.warning("replica %s ejected (unreachable: %s)", self.url, error)
            self.healthy = False
        if isinstance(error, EngineUnavailable) and self.serves(model):
            logger.warning("replica %s: the engine of %s is down; skipped for %.0f s", self.url, model,
                           ENGINE_COOLDOWN_SECONDS)
            self.cooling[model] = time.monotonic() + ENGINE_COOLDOWN_SECONDS

    def serves(self, model: str) -> bool:
        return self.healthy and model in self.models and self.cooling.get(model, 0.0) <= time.monotonic()

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        if self._admin is not None:
            await self._admin.close()


async def _model_ready(admin: Any, name: str, timeout: float) -> bool:
    from tritonclient.utils import InferenceServerException
    try:
        return bool(await admin.is_model_ready(name, client_timeout=timeout))
    except InferenceServerException as e:  # a model this server does not have, or one loading; not its health
        if e.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):  # the server's, though
            raise
        return False


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """HOST:PORT of every address `host` has: for a Kubernetes headless Service, one per ready pod."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in (info[4][0] for info in infos)})


class ReplicaPool:
    """`urls`: fixed replicas. `dns_names`: HOST:PORT names resolved before every health check, each
    address a replica; one that leaves the DNS answer leaves the pool (its streams in flight finish)."""

    def __init__(self, urls: list[str], models: list[str], interval: float = GatewayConfig.health_interval,
                 upstream_timeout: float = GatewayConfig.upstream_timeout,
                 dns_names: list[str] | None = None, resolver: Resolver = resolve,
                 routing: RoutingConfig | None = None) -> None:
        self.replicas = [Replica(url, upstream_timeout) for url in urls]
        self.router = Router(routing or RoutingConfig())
        self.names = models  # the Triton models to serve, where a replica has them ready
        self.interval, self.upstream_timeout = interval, upstream_timeout
        self.dns_names, self.resolver = dns_names or [], resolver
        self._found: dict[str, set[str]] = {}  # DNS name -> the replicas it gave
        self._tasks: list[asyncio.Task] = []

    async def check_all(self) -> None:
        await self.discover()
        await asyncio.gather(*(r.check(self.names) for r in self.replicas))

    async def discover(self) -> None:
        for name in self.dns_names:
            host, _, port = name.rpartition(":")
            try:
                urls = set(await self.resolver(host, int(port)))
            except OSError as e:  # DNS down for a moment: keep what it said last
                logger.warning("--triton-dns %s does not resolve (%s); keeping %d replicas", name, e,
                               len(self._found.get(name, ())))
                continue
            known, gone = {r.url for r in self.replicas}, self._found.get(name, set()) - urls
            self.replicas = [r for r in self.replicas if r.url not in gone]
            self.replicas += [Replica(url, self.upstream_timeout) for url in sorted(urls - known)]
            if gone or urls - known:
                logger.warning("--triton-dns %s: replicas added %s, removed %s", name, sorted(urls - known),
                               sorted(gone))
            self._found[name] = urls

    async def start(self) -> None:
        await self.check_all()
        await self.router.load_tokenizers()
        await self.router.poll(self.replicas, self.names)
        self._tasks = [asyncio.create_task(self._checks()), asyncio.create_task(self._polls())]

    async def _checks(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_all()

    async def _polls(self) -> None:
        while True:
            await asyncio.sleep(self.router.config.poll_interval)
            await self.router.poll(self.replicas, self.names)

    def models(self) -> set[str]:
        return set().union(*(r.models for r in self.replicas if r.healthy))

    def pick(self, model: str, prompt: Prompt | None = None, exclude: Replica | None = None) -> RoutingDecision | None:
        """The replica for a request of `model` (None: no healthy replica serves it), and why."""
        candidates = [r for r in self.replicas if r.serves(model) and r is not exclude]
        if not candidates:
            return None
        return self.router.choose(candidates, model, prompt or Prompt(None))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(r.close() for r in self.replicas))
