"""Loading and unloading LoRA adapters while the service runs, as vLLM's POST /v1/load_lora_adapter and
/v1/unload_lora_adapter take them (admin keys only): each healthy replica's llm model is told through its
`lora_control` input (its engine.json's lora_dir bounds where adapters may come from), then the adapter is
routed by name (config.lora_adapters), or no longer. A replica that restarts its engine keeps what it had loaded;
a replica that joins later has only its multi_lora.json's."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from pagedllm.gateway.admission import read_body
from pagedllm.gateway.config import GatewayConfig
from pagedllm.gateway.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError, from_upstream
from pagedllm.gateway.keys import KeyRing
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm_client import ClientError

MAX_BODY_BYTES = 4096
# the fields the servers name (the llm model's lora_control, the engine's lora_request) as this API names them
RENAMED = {"lora_control.lora_name": "lora_name", "lora_control.lora_path": "lora_path", "lora_control": "lora_path",
           "lora_control.pinned": "pinned", "lora_request": "lora_path", "lora_request.path": "lora_path",
           "lora_request.name": "lora_name"}


class AdapterAdmin:
    def __init__(self, config: GatewayConfig, pool: ReplicaPool, keys: KeyRing) -> None:
        self.config, self.pool, self.keys = config, pool, keys

    async def load(self, request: Request) -> str:
        body = await self._body(request, ("lora_name", "lora_path", "model", "pinned"))
        name, model = body["lora_name"], self._base(body.get("model"))
        if not isinstance(body.get("lora_path"), str) or not body["lora_path"]:
            raise InvalidRequestError("lora_path: the adapter's folder on the servers", "lora_path")
        if not isinstance(body.get("pinned", False), bool):
            raise InvalidRequestError("pinned: true or false", "pinned")
        if name in self.config.route_names() and self.config.lora_adapters.get(name) != model:
            raise InvalidRequestError(f"lora_name: {name!r} is a model's name already", "lora_name")
        await self._each_replica(model, "load", name, body["lora_path"], body.get("pinned", False))
        self.config.lora_adapters[name] = model
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, request: Request) -> str:
        body = await self._body(request, ("lora_name", "model"))
        name = body["lora_name"]
        model = self.config.lora_adapters.get(name)
        if model is None:
            raise NotFoundError(f"lora_name: no adapter {name!r} is loaded", "lora_name", "model_not_found")
        del self.config.lora_adapters[name]  # routed no more, before the replicas forget it
        await self._each_replica(model, "unload", name)
        return f"Success: LoRA adapter '{name}' removed successfully."

    async def _body(self, request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
        self.keys.authenticate(request.headers.get("authorization")).check_admin()
        try:
            body = json.loads(await read_body(request, MAX_BODY_BYTES))
        except ValueError:
            raise InvalidRequestError("the body is not JSON", None, "invalid_json") from None
        if not isinstance(body, dict) or set(body) - set(fields):
            raise InvalidRequestError(f"expected an object with {', '.join(fields)}", None)
        if not isinstance(body.get("lora_name"), str) or not body["lora_name"]:
            raise InvalidRequestError("lora_name: the adapter's name", "lora_name")
        return body

    def _base(self, model: str | None) -> str:
        """The Triton model the adapter goes on: `model`, or the one model served."""
        if model is None:
            if len(self.config.models) != 1:
                raise InvalidRequestError(f"model: this gateway serves {', '.join(self.config.models)}; name the "
                                          "adapter's base model", "model")
            return self.config.models[0]
        if model not in self.config.models:
            raise NotFoundError(f"model: {model!r} is not served here", "model", "model_not_found")
        return model

    async def _each_replica(self, model: str, action: str, name: str, path: str | None = None,
                            pinned: bool = False) -> None:
        replicas = [r for r in self.pool.replicas if r.healthy and r.serves(model)]
        if not replicas:
            raise ServiceUnavailableError(f"no healthy replica has model {model!r} ready; retry shortly", None,
                                          "no_healthy_replica", 1.0)
        for replica in replicas:
            try:
                await replica.client(model).change_adapter(action, name, path, pinned)
            except ClientError as e:
                raise from_upstream(e, RENAMED) from None
