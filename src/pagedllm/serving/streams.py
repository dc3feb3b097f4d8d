"""The `llm` model's open streams: each request's response sender, the engine's deltas turned into Triton
responses on a responder thread (coalesced under load, streamed or answered once at the end), cancelled
streams noticed and aborted, and latency observed. Every request gets exactly one final response, whatever
raises where.

It never imports Triton's Python backend: responses are built by a `Responses` (the model's
`PythonBackend`), and senders are the request's response sender, so unit tests run it with fakes."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pagedllm.engine.sequence import FinishReason, RequestDelta, TokenLogprobs, coalesce
from pagedllm.errors import ErrorCode, RequestError
from pagedllm.serving.request import ResponseOptions
from pagedllm.serving.response import RESPONSE_OPTIONS, RawResponse, requested_outputs, shape_response

logger = logging.getLogger("pagedllm.serving")
_LOST_FINAL = RequestError(ErrorCode.INTERNAL, "the final response could not be built; retry the request")


class Responses(Protocol):
    final_flag: int

    def response(self, tensors: dict[str, np.ndarray]) -> Any: ...

    def error(self, error: RequestError) -> Any: ...


@dataclass
class Stream:
    request_id: str
    sender: Any  # the request's response sender: send(response=None, flags=0), is_cancelled()
    options: ResponseOptions
    response_options: np.ndarray | None  # in the ensemble, where postprocessing prepends the prompt
    arrival: float
    # what the engine handed out since the last response: a response reports only its own tokens
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_tokens: int = 0
    last_token_time: float | None = None
    cancel_checked: float = 0.0


class Streams:
    def __init__(self, responses: Responses, abort: Callable[[str], None], metrics: Any,
                 token_text: Callable[[int], str], poll_seconds: float = 0.05, checks_per_poll: int = 8) -> None:
        self.responses, self.abort, self.metrics, self.token_text = responses, abort, metrics, token_text
        self.poll_seconds, self.checks_per_poll = poll_seconds, checks_per_poll
        self._open: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[RequestDelta] = queue.SimpleQueue()
        self._last_poll = time.monotonic()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagedllm-responder", daemon=True)

    def __len__(self) -> int:
        return len(self._open)

    def open(self, request_id: str, sender: Any, options: ResponseOptions,
             response_options: np.ndarray | None = None) -> Stream:
        stream = Stream(request_id, sender, options, response_options, time.monotonic())
        with self._lock:
            self._open[request_id] = stream
        return stream

    def refuse(self, request_id: str, sender: Any, error: RequestError) -> None:
        """The request's one and final response is an error (it never reached the engine)."""
        self._forget(request_id)
        self.metrics.on_failure(error.code)
        try:
            sender.send(self.responses.error(for_client(request_id, error)), flags=self.responses.final_flag)
        except Exception:
            logger.exception("refusing request %s failed", request_id)

    def deliver(self, delta: RequestDelta) -> None:
        """The engine's callback, from any thread: the responder sends it."""
        self._outbox.put(delta)

    # ---- the responder thread -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Abort what is still open (each stream gets its final response), then stop the responder."""
        with self._lock:
            pending = list(self._open)
        for request_id in pending:
            self.abort(request_id)
        deadline = time.monotonic() + timeout
        while self._open and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping = True
        self._thread.join(timeout)

    def _run(self) -> None:
        while not (self._stopping and not self._open):
            self.run_once()

    def run_once(self) -> None:
        """Send what the engine handed out (a request's waiting deltas as one response), then, once per
        poll, abort the streams whose clients left and flush the metrics."""
        for delta in coalesce(self._take()):
            self._send(delta)
        if time.monotonic() - self._last_poll >= self.poll_seconds:
            self._abort_cancelled()
            self.metrics.flush()
            self._last_poll = time.monotonic()

    def _take(self) -> list[RequestDelta]:
        try:
            batch = [self._outbox.get(timeout=self.poll_seconds)]
        except queue.Empty:
            return []
        while not self._outbox.empty():
            batch.append(self._outbox.get_nowait())
        return batch

    def _abort_cancelled(self) -> None:
        """A few streams per poll, the longest unchecked first: each check is a round trip to the Triton
        process, and checking every stream every poll cost more than sending the responses did."""
        now = time.monotonic()
        with self._lock:
            due = sorted(self._open.values(), key=lambda s: s.cancel_checked)[:self.checks_per_poll]
            for stream in due:
                stream.cancel_checked = now
            cancelled = [s.request_id for s in due if s.sender.is_cancelled()]
        for request_id in cancelled:
            self.abort(request_id)

    def _forget(self, request_id: str) -> Stream | None:
        with self._lock:
            return self._open.pop(request_id, None)

    # ---- one delta -> at most one response ------------------------------------------------------
    def _send(self, delta: RequestDelta) -> None:
        with self._lock:
            stream = self._open.get(delta.request_id)
        if stream is None:
            return
        final_sent = False
        try:
            self._observe(stream, delta)
            self._respond(stream, delta)
            final_sent = delta.finished
        except Exception:
            logger.exception("sending a response for request %s failed", delta.request_id)
        finally:
            if delta.finished:
                self._forget(delta.request_id)
                if not final_sent:
                    self._send_lost_final(stream)

    def _respond(self, stream: Stream, delta: RequestDelta) -> None:
        flags = self.responses.final_flag if delta.finished else 0
        if delta.error is not None:
            stream.sender.send(self.responses.error(for_client(delta.request_id, delta.error)), flags=flags)
            return
        response = self._response_for(stream, delta)
        if response is not None and not (delta.finish_reason is FinishReason.ABORT and stream.sender.is_cancelled()):
            stream.sender.send(response, flags=flags)
        elif flags:
            stream.sender.send(flags=flags)

    def _send_lost_final(self, stream: Stream) -> None:
        """Building or sending the final response raised: the client still gets a final one."""
        try:
            stream.sender.send(self.responses.error(_LOST_FINAL), flags=self.responses.final_flag)
        except Exception:
            logger.exception("the final response of request %s could not be sent", stream.request_id)

    def _response_for(self, stream: Stream, delta: RequestDelta) -> Any:
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
        if stream.response_options is not None:
            tensors[RESPONSE_OPTIONS] = stream.response_options
        else:
            tensors = shape_response(tensors, stream.options)
        return self.responses.response(tensors)

    def _observe(self, stream: Stream, delta: RequestDelta) -> None:
        now = time.monotonic()
        count = len(delta.new_token_ids)
        if count:
            first = now - stream.arrival if stream.last_token_time is None else None
            gap = now - stream.last_token_time if stream.last_token_time is not None else None
            stream.last_token_time = now
            self.metrics.on_tokens(count, first, gap / count if gap is not None else None)
        if delta.finished and delta.error is not None:
            self.metrics.on_failure(delta.error.code)
        elif delta.finished:
            self.metrics.on_finish(delta.finish_reason or FinishReason.ABORT, delta.num_prompt_tokens,
                                   now - stream.arrival, delta.queue_time)


def for_client(request_id: str, error: RequestError) -> RequestError:
    """What a client reads of an error: the server's own failures (INTERNAL) are logged and named only by the
    request's id; their words may hold paths and internals."""
    if error.code is not ErrorCode.INTERNAL:
        return error
    logger.error("request %s failed: %s", request_id, error)
    return RequestError(ErrorCode.INTERNAL, f"internal error in request {request_id}; the server's log has the detail")
