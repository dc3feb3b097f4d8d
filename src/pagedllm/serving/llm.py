"""The decoupled `llm` model: requests parsed and tokenized, submitted to the engine process, and each
one's deltas streamed back by `Streams`."""
from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pagedllm.engine import wire
from pagedllm.engine.config import read_engine_json
from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.faults import Faults
from pagedllm.engine.lora import read_multi_lora
from pagedllm.engine.sequence import RequestDelta
from pagedllm.engine.tokenizer import load_tokenizer, tools_reach_the_model_by
from pagedllm.errors import ErrorCode, InvalidRequestError, ModelConfigError, RequestError
from pagedllm.serving.metrics import ServingMetrics
from pagedllm.serving.python_backend import PythonBackend
from pagedllm.serving.request import (
    CACHE_STATE,
    LORA_CONTROL,
    NORMALISED_REQUEST,
    GenerateRequest,
    LoRAControl,
    ResponseOptions,
    parse_cache_query,
    parse_lora_control,
    parse_request,
)
from pagedllm.serving.response import prepends_prompt
from pagedllm.serving.streams import Streams
from pagedllm.serving.tokenization import PromptLimit, tokenize_request
from pagedllm.weights import resolve_model_path

logger = logging.getLogger("pagedllm.serving")


def require_decoupled(config: dict[str, Any], name: str) -> None:
    if not config.get("model_transaction_policy", {}).get("decoupled", False):
        raise ModelConfigError(f"{name}: the llm model streams, so its config.pbtxt needs "
                               "`model_transaction_policy { decoupled: true }`")


class LLMModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.backend = PythonBackend(args)
        self.name = args["model_name"]
        require_decoupled(self.backend.config, self.name)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        engine_config, supervision = read_engine_json(version_dir / "engine.json")
        try:  # the adapters of multi_lora.json beside engine.json, as Triton's vLLM backend serves them
            engine_config = dataclasses.replace(engine_config, lora_modules={**engine_config.lora_modules,
                                                                             **read_multi_lora(version_dir)})
        except ValueError as e:
            raise ModelConfigError(f"{self.name}: {e}") from None
        self.adapters = set(engine_config.lora_modules)
        self.lora_dir = Path(engine_config.lora_dir).resolve() if engine_config.lora_dir else None
        self.metrics = ServingMetrics(self.backend.pb.MetricFamily, self.name, args["model_version"])
        # The tokenizer (and with it transformers and torch, which this stub does not import before) loads while
        # the engine process starts: waiting for the engine holds no GIL.
        with ThreadPoolExecutor(1) as pool:
            tokenizer = pool.submit(load_tokenizer, resolve_model_path(engine_config.model))
            self.loop = EngineProcess(engine_config, supervision, on_stats=self.metrics.on_stats,
                                      on_restart=self.metrics.on_restart, on_give_up=self._on_engine_death,
                                      faults=Faults.for_model(self.name))
            self.tokenizer = tokenizer.result()
        token_text = functools.lru_cache(maxsize=1 << 16)(lambda token_id: self.tokenizer.decode([token_id]))
        self.backend.log_info(f"pagedllm {self.name}/{args['model_version']}: engine ready in process "
                              f"{self.loop.process.pid}, {self.loop.info.num_blocks} KV blocks "
                              f"({self.loop.info.kv_cache_dtype}); "
                              f"{self.loop.info.compute_path}; a chat's tools reach the model through "
                              f"{tools_reach_the_model_by(self.tokenizer)}")
        self.prompt_limit = PromptLimit.for_tokenizer(self.tokenizer, self.loop.info.max_model_len)
        self.metrics.on_ready(self.loop.info)
        self.metrics.on_stats(self.loop.info.stats)  # gauges are right before the first request
        self.metrics.flush()
        self.streams = Streams(self.backend, self.loop.abort, self.metrics, token_text)
        self.streams.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._accept(request)
        return None

    def _accept(self, request: Any) -> None:
        sender = request.get_response_sender()
        request_id = uuid.uuid4().hex
        try:
            inputs = self.backend.inputs(request)
            if LORA_CONTROL in inputs:
                return self._change_adapters(request_id, sender, parse_lora_control(inputs))
            if CACHE_STATE in inputs:
                return self._answer_cache_state(sender, *parse_cache_query(inputs))
            req, in_ensemble = self._parse(inputs)
            if req.lora_name is not None and req.lora_name not in self.adapters:
                raise InvalidRequestError("sampling_parameters.lora_name", f"no adapter {req.lora_name!r} here; "
                                          f"this model serves {', '.join(sorted(self.adapters)) or 'no adapters'}")
            prompt_ids = tokenize_request(self.tokenizer, req, self.prompt_limit)
            response_options = (np.array([req.options.to_json().encode()], dtype=np.object_)
                                if in_ensemble and prepends_prompt(req.options) else None)
            stream = self.streams.open(request_id, sender, req.options, response_options)
            self.loop.submit(request_id, prompt_ids, req.params, self.streams.deliver, arrival_time=stream.arrival,
                             lora_name=req.lora_name)
        except Exception as e:  # every request gets its one final response, whatever raised
            error = RequestError.of(e)
            if error.code is ErrorCode.INTERNAL:
                logger.exception("accepting request %s failed", request_id)
            self.streams.refuse(request_id, sender, error)  # an internal error's words go to the log only

    def _answer_cache_state(self, sender: Any, epoch: str | None, since: int) -> None:
        """Which prefix blocks the engine holds, as one final response whose text_output is a
        kv_events.CacheState's JSON; answered here, without waiting for the engine's step."""
        state = self.loop.cache_state(epoch, since).to_json()
        sender.send(self.backend.response({"text_output": np.array([state.encode()], dtype=np.object_)}),
                    flags=self.backend.final_flag)

    def _change_adapters(self, request_id: str, sender: Any, control: LoRAControl) -> None:
        """Load or unload an adapter in the engine; the request's one final response says how it went. Loads come
        only from folders inside engine.json's lora_dir. A restarted engine registers what is loaded then."""
        if self.lora_dir is None:
            raise InvalidRequestError(LORA_CONTROL, "runtime adapter loading is off for this model; set lora_dir "
                                                    "(and enable_lora) in its engine.json")
        if control.action == "load":
            path = Path(control.path).resolve()
            if not path.is_relative_to(self.lora_dir):
                raise InvalidRequestError(f"{LORA_CONTROL}.lora_path", f"must be a folder inside lora_dir "
                                                                       f"{self.lora_dir}")
            change = wire.LoadAdapter(request_id, control.name, str(path), control.pinned)
        else:
            change = wire.UnloadAdapter(request_id, control.name)
        self.streams.open(request_id, sender, ResponseOptions())

        def done(delta: RequestDelta) -> None:
            if delta.error is None:
                modules = dict(self.loop.config.lora_modules)
                if control.action == "load":
                    modules[control.name] = str(path)
                    self.adapters.add(control.name)
                else:
                    modules.pop(control.name, None)
                    self.adapters.discard(control.name)
                self.loop.config = dataclasses.replace(self.loop.config, lora_modules=modules)
            self.streams.deliver(delta)

        self.loop.change_adapters(change, done)

    def _parse(self, inputs: dict[str, np.ndarray]) -> tuple[GenerateRequest, bool]:
        """The request, and whether it came from preprocessing (in the ensemble) rather than a client."""
        max_tokens = self.prompt_limit.max_tokens
        if NORMALISED_REQUEST not in inputs:
            return parse_request(inputs, max_tokens), False
        return GenerateRequest.from_inputs(inputs, max_tokens), True

    def _on_engine_death(self, reason: str) -> None:
        """The engine kept dying and stays down. Not ready rather than hanging: with explicit model control
        the model unloads itself (Triton then reports it not ready); otherwise every request is refused at
        once as UNAVAILABLE."""
        self.backend.log_error(f"pagedllm {self.name}: the engine stays down ({reason}); unloading the model")
        try:
            self.backend.pb.unload_model(self.name)
        except Exception as e:  # model control is not explicit
            self.backend.log_error(f"pagedllm {self.name}: cannot unload ({e}); requests are refused until restart")

    def finalize(self) -> None:
        """Abort what is in flight (each stream gets its final response), then stop the engine."""
        self.streams.stop()
        self.loop.shutdown()

