"""The Triton Python-backend models. Each model.py in model_repository/ is one import of a class here.

`triton_python_backend_utils` exists only inside tritonserver's Python stub, so it is imported in
`initialize`; everything it touches beyond that lives in the unit-tested modules beside this one."""
from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.loop import EngineDeadError
from pagedllm.engine.sequence import RequestDelta, TokenLogprobs, coalesce
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.serving.metrics import ServingMetrics
from pagedllm.serving.prompts import tokenize_request
from pagedllm.serving.request import GenerateRequest, InvalidRequestError, ResponseOptions, parse_request
from pagedllm.serving.response import RawResponse, prepends_prompt, requested_outputs, shape_response
from pagedllm.weights import resolve_model_path

logger = logging.getLogger("pagedllm.serving")
_CANCEL_POLL_SECONDS = 0.05
_CANCEL_CHECKS_PER_POLL = 8


def _backend() -> Any:
    import triton_python_backend_utils as pb_utils  # only inside tritonserver
    return pb_utils


def _inputs(pb: Any, request: Any, names: list[str]) -> dict[str, np.ndarray]:
    found = {}
    for name in names:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def _response(pb: Any, tensors: dict[str, np.ndarray]) -> Any:
    return pb.InferenceResponse(output_tensors=[pb.Tensor(name, value) for name, value in tensors.items()])


def _parameter(config: dict, key: str) -> str | None:
    """A `parameters { key: ... value: { string_value: ... } }` entry of config.pbtxt, if set."""
    return config.get("parameters", {}).get(key, {}).get("string_value") or None


def _error(pb: Any, message: str, code: str = "INVALID_ARG") -> Any:
    return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(message, getattr(pb.TritonError, code)))


@dataclass
class _Stream:
    request_id: str
    sender: Any
    options: ResponseOptions
    echo: np.ndarray | None  # in the ensemble, where postprocessing prepends the prompt: the options it needs
    arrival: float
    # what the engine handed out since the last response: a response reports only its own tokens
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0
    last_token_time: float | None = None
    cancel_checked: float = 0.0


class LLMModel:
    """The decoupled `llm` model: the engine's background loop, streaming each request's deltas."""

    def initialize(self, args: dict[str, str]) -> None:
        self.pb = _backend()
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        engine_config = EngineConfig.from_json(version_dir / "engine.json")
        self.metrics = ServingMetrics(self.pb.MetricFamily, args["model_name"], args["model_version"])
        self.name = args["model_name"]
        self.tokenizer = load_tokenizer(resolve_model_path(engine_config.model))
        self.loop = EngineProcess(engine_config, on_stats=self.metrics.on_stats, on_restart=self.metrics.on_restart,
                                  on_give_up=self._on_engine_death)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(lambda token_id: self.tokenizer.decode([token_id]))
        self.pb.Logger.log_info(f"pagedllm {args['model_name']}/{args['model_version']}: engine ready in process "
                                f"{self.loop.process.pid}, {self.loop.info['num_blocks']} KV blocks")
        self.metrics.on_stats(self.loop.info["stats"])  # gauges are right before the first request
        self.metrics.flush()
        self.streams: dict[str, _Stream] = {}
        self.lock = threading.Lock()
        self.outbox: queue.SimpleQueue[RequestDelta] = queue.SimpleQueue()
        self.stopping = False
        self.responder = threading.Thread(target=self._respond, name="pagedllm-responder", daemon=True)
        self.responder.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._accept(request)
        return None

    def _accept(self, request: Any) -> None:
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        request_id = uuid.uuid4().hex
        try:
            inputs = _inputs(self.pb, request, self.input_names)
            req, in_ensemble = self._parse(inputs)
            prompt_ids = tokenize_request(self.tokenizer, req)
            echo = (np.array([req.options.echo().encode()], dtype=np.object_)
                    if in_ensemble and prepends_prompt(req.options) else None)
            stream = _Stream(request_id, sender, req.options, echo, time.monotonic())
            with self.lock:
                self.streams[request_id] = stream
            self.loop.submit(request_id, prompt_ids, req.params, self.outbox.put, arrival_time=stream.arrival)
        except (ValueError, EngineDeadError) as e:  # invalid, or retry later (overload comes back as a delta)
            self._forget(request_id)
            sender.send(_error(self.pb, str(e), "INVALID_ARG" if isinstance(e, ValueError) else "UNAVAILABLE"),
                        flags=final)

    def _on_engine_death(self, reason: str) -> None:
        """The engine kept dying and stays down. Not ready rather than hanging: with explicit model control
        the model unloads itself (Triton then reports it not ready); otherwise every request is refused at
        once as UNAVAILABLE."""
        self.pb.Logger.log_error(f"pagedllm {self.name}: the engine stays down ({reason}); unloading the model")
        try:
            self.pb.unload_model(self.name)
        except Exception as e:  # model control is not explicit
            self.pb.Logger.log_error(f"pagedllm {self.name}: cannot unload ({e}); requests are refused until restart")

    @staticmethod
    def _parse(inputs: dict[str, np.ndarray]) -> tuple[GenerateRequest, bool]:
        """The request, and whether it came from preprocessing (in the ensemble) rather than a client."""
        if "request" not in inputs:
            return parse_request(inputs), False
        normalised = bytes(inputs["request"].reshape(-1)[0]).decode("utf-8")
        ids = [int(x) for x in inputs.get("input_ids", np.zeros(0, np.int32)).reshape(-1)]
        return GenerateRequest.from_json(normalised, ids), True

    def _forget(self, request_id: str) -> _Stream | None:
        with self.lock:
            return self.streams.pop(request_id, None)

    # ---- the responder thread: sends responses, notices cancellations ----------------------------
    def _respond(self) -> None:
        last_poll = time.monotonic()
        while not (self.stopping and not self.streams):
            try:
                batch = [self.outbox.get(timeout=_CANCEL_POLL_SECONDS)]
                while not self.outbox.empty():
                    batch.append(self.outbox.get_nowait())
            except queue.Empty:
                batch = []
            # Under load several tokens of a request wait here: they go out as one response.
            for delta in coalesce(batch):
                try:
                    self._send(delta)
                except Exception:
                    logger.exception("sending a response for request %s failed", delta.request_id)
            if time.monotonic() - last_poll >= _CANCEL_POLL_SECONDS:
                self._abort_cancelled()
                self.metrics.flush()
                last_poll = time.monotonic()

    def _abort_cancelled(self) -> None:
        """A few streams per poll, the longest unchecked first: each check is a round trip to the Triton
        process, and checking every stream every poll cost more than sending the responses did."""
        now = time.monotonic()
        with self.lock:
            due = sorted(self.streams.values(), key=lambda s: s.cancel_checked)[:_CANCEL_CHECKS_PER_POLL]
            for stream in due:
                stream.cancel_checked = now
            cancelled = [s.request_id for s in due if s.sender.is_cancelled()]
        for request_id in cancelled:
            self.loop.abort(request_id)

    def _send(self, delta: RequestDelta) -> None:
        with self.lock:
            stream = self.streams.get(delta.request_id)
        if stream is None:
            return
        self._observe(stream, delta)
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if delta.finished else 0
        if delta.finished:
            self._forget(delta.request_id)
        if delta.error is not None:
            stream.sender.send(_error(self.pb, delta.error, delta.error_code), flags=final)
            return
        response = self._response_for(stream, delta)
        if response is not None and not (delta.finish_reason == "abort" and stream.sender.is_cancelled()):
            stream.sender.send(response, flags=final)
        elif final:
            stream.sender.send(flags=final)

    def _response_for(self, stream: _Stream, delta: RequestDelta) -> Any:
        """Streamed: a response whenever there is new text (the detokenizer holds back partial characters
        and possible stop strings); otherwise one answer at the end. `num_output_tokens` counts the tokens
        of this response, as in Triton's vLLM backend."""
        stream.text.append(delta.new_text)
        stream.logprobs += delta.new_logprobs or []
        stream.num_tokens += len(delta.new_token_ids)
        if not (delta.finished or (stream.options.stream and delta.new_text)):
            return None
        raw = RawResponse("".join(stream.text), delta.finish_reason, delta.num_prompt_tokens, stream.num_tokens,
                          stream.logprobs, self.token_text)
        stream.text, stream.logprobs, stream.num_tokens = [], [], 0
        tensors = raw.to_tensors(requested_outputs(stream.options))
        if stream.echo is not None:
            tensors["request"] = stream.echo
        else:
            tensors = shape_response(tensors, stream.options)
        return _response(self.pb, tensors)

    def _observe(self, stream: _Stream, delta: RequestDelta) -> None:
        now = time.monotonic()
        count = len(delta.new_token_ids)
        if count:
            first = now - stream.arrival if stream.last_token_time is None else None
            gap = now - stream.last_token_time if stream.last_token_time is not None else None
            stream.last_token_time = now
            self.metrics.on_tokens(count, first, gap / count if gap is not None else None)
        if delta.finished:
            self.metrics.on_finish(delta.finish_reason or "abort", delta.num_prompt_tokens, now - stream.arrival,
                                   delta.queue_time)

    def finalize(self) -> None:
        """Abort what is in flight (each stream gets its final response), then stop the threads."""
        with self.lock:
            pending = list(self.streams)
        for request_id in pending:
            self.loop.abort(request_id)
        deadline = time.monotonic() + 5.0
        while self.streams and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopping = True
        self.loop.shutdown()
        self.responder.join(timeout=5.0)


class PreprocessingModel:
    """Validation, chat template and tokenization in front of the `llm` model."""

    def initialize(self, args: dict[str, str]) -> None:
        self.pb = _backend()
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        self.tokenizer = load_tokenizer(resolve_model_path(_parameter(config, "model")))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            req = parse_request(_inputs(self.pb, request, self.input_names))
            ids = tokenize_request(self.tokenizer, req)
        except InvalidRequestError as e:
            return _error(self.pb, str(e))
        return _response(self.pb, {"input_ids": np.array(ids, dtype=np.int32),
                                   "request": np.array([req.to_json().encode()], dtype=np.object_)})


class PostprocessingModel:
    """The response fields clients see, shaped from the `llm` model's raw outputs."""

    def initialize(self, args: dict[str, str]) -> None:
        self.pb = _backend()

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        """The llm model sends only the outputs the client asked for, and the options (`request`) only where
        the prompt is to be prepended: any other response goes back as it came, with no new tensors built
        (building them costs more than the rest of this step)."""
        echo = self.pb.get_input_tensor_by_name(request, "request")
        if echo is None:
            return self.pb.InferenceResponse(output_tensors=request.inputs())
        raw = {t.name(): t.as_numpy() for t in request.inputs() if t.name() != "request"}
        options = ResponseOptions(**json.loads(echo.as_numpy().reshape(-1)[0]))
        return _response(self.pb, shape_response(raw, options))


class UnaryModel:
    """A non-decoupled front for clients that cannot stream (gRPC ModelInfer rejects decoupled models):
    forwards the request to the target model through BLS and returns its single answer."""

    def initialize(self, args: dict[str, str]) -> None:
        self.pb = _backend()
        config = json.loads(args["model_config"])
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o["name"] for o in config["output"]]
        self.target = _parameter(config, "target") or "ensemble"

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        inputs = _inputs(self.pb, request, self.input_names)
        inputs["stream"] = np.array([False])
        bls = self.pb.InferenceRequest(model_name=self.target, requested_output_names=self.output_names,
                                       inputs=[self.pb.Tensor(n, v) for n, v in inputs.items()])
        answer = None
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return self.pb.InferenceResponse(output_tensors=[], error=response.error())
            if response.output_tensors():
                answer = response
        if answer is None:
            return _error(self.pb, f"{self.target} returned no answer", "INTERNAL")
        return self.pb.InferenceResponse(output_tensors=answer.output_tensors())
