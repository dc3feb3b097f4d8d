"""The synchronous client over gRPC streaming (one connection reused for the client's life)."""
from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from pagedllm_client.errors import ClientError, Timeout, from_triton


@dataclass
class Completion:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    latency: float
    time_to_first_token: float | None = None
    deltas: list[str] = field(default_factory=list)


def request_inputs(prompt: str | None, messages: list[dict[str, str]] | None, stream: bool,
                   sampling: dict[str, Any]) -> list[grpcclient.InferInput]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    values: dict[str, np.ndarray] = {
        "stream": np.array([stream]), "exclude_input_in_output": np.array([True]),
        "return_finish_reason": np.array([True]), "return_num_input_tokens": np.array([True]),
        "return_num_output_tokens": np.array([True]),
    }
    if prompt is not None:
        values["text_input"] = np.array([prompt.encode()], dtype=np.object_)
    else:
        values["messages"] = np.array([json.dumps(messages).encode()], dtype=np.object_)
    if sampling:
        values["sampling_parameters"] = np.array([json.dumps(sampling).encode()], dtype=np.object_)
    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


class Client:
    def __init__(self, url: str = "localhost:8001", model: str = "ensemble", timeout: float = 120.0) -> None:
        self.url, self.model, self.timeout = url, model, timeout
        self._grpc = grpcclient.InferenceServerClient(url)

    def stream(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
               **sampling: Any) -> Iterator[str]:
        """Yield text deltas as they are generated; leaving early cancels the request on the server."""
        for delta, _ in self._stream(prompt, messages, sampling):
            if delta:
                yield delta

    def generate(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
                 **sampling: Any) -> Completion:
        start = time.monotonic()
        completion = Completion("", None, 0, 0, 0.0)
        for delta, result in self._stream(prompt, messages, sampling):
            if delta and completion.time_to_first_token is None:
                completion.time_to_first_token = time.monotonic() - start
            completion.deltas.append(delta)
            reason = result.as_numpy("finish_reason")
            if reason is not None and reason.reshape(-1)[0]:
                completion.finish_reason = reason.reshape(-1)[0].decode()
                completion.num_input_tokens = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
                completion.num_output_tokens = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        completion.text = "".join(completion.deltas)
        completion.latency = time.monotonic() - start
        return completion

    def _stream(self, prompt: str | None, messages: list[dict[str, str]] | None,
                sampling: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        results: queue.Queue = queue.Queue()
        self._grpc.start_stream(callback=lambda result, error: results.put((result, error)))
        finished = False
        try:
            self._grpc.async_stream_infer(self.model, request_inputs(prompt, messages, True, sampling),
                                          enable_empty_final_response=True)
            while not finished:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise Timeout(f"no response from {self.model} within {self.timeout}s") from None
                if error is not None:
                    raise from_triton(error)
                finished = result.get_response().parameters["triton_final_response"].bool_param
                text = result.as_numpy("text_output")
                yield (text.reshape(-1)[0].decode() if text is not None and text.size else ""), result
        except InferenceServerException as e:
            raise from_triton(e) from None
        finally:
            self._grpc.stop_stream(cancel_requests=not finished)

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "Completion", "ClientError"]
