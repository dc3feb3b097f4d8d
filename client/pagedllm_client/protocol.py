"""What goes over the wire, for both protocols: request fields in, `Chunk`s out, and the `Completion`
built from them. The transports (client.py, aio.py) only move these."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from pagedllm_client.errors import classify

PROTOCOLS = ("grpc", "http")


@dataclass
class Chunk:
    """One streamed response: new text, and the request's totals on the final one."""
    text: str
    final: bool
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    logprobs: list[dict[str, Any]] | None = None  # one entry per token of this response, when asked for


@dataclass
class Completion:
    """A request's answer folded from its chunks: the one folding rule, which the gateway's answers use too."""
    text: str = ""
    finish_reason: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one entry per token, when asked for
    latency: float = 0.0
    time_to_first_token: float | None = None
    deltas: list[str] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # seconds from the start, one per delta
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each delta (1 where the server omits it)
    _start: float = field(default_factory=time.monotonic, repr=False)

    def add(self, chunk: Chunk) -> None:
        now = time.monotonic() - self._start
        if chunk.text:
            self.text += chunk.text
            self.deltas.append(chunk.text)
            self.chunk_times.append(now)
            self.chunk_tokens.append(chunk.num_output_tokens or 1)
            if self.time_to_first_token is None:
                self.time_to_first_token = now
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.num_input_tokens = chunk.num_input_tokens or self.num_input_tokens
        self.num_output_tokens += chunk.num_output_tokens or 0  # each response counts its own tokens
        self.logprobs += chunk.logprobs or []
        self.latency = now


TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")  # OpenAI's names, and the contract's inputs


def request_fields(prompt: str | None, messages: list[dict[str, Any]] | None,
                   sampling: dict[str, Any]) -> dict[str, Any]:
    """The inputs of one streamed request, as the vLLM-backend contract names them. `sampling` may also hold
    a chat's tools, tool_choice and parallel_tool_calls, as OpenAI's chat API names them."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    sampling = dict(sampling)
    tools = {name: sampling.pop(name) for name in TOOL_FIELDS if sampling.get(name) is not None}
    fields: dict[str, Any] = {"stream": True, "exclude_input_in_output": True, "return_finish_reason": True,
                              "return_num_input_tokens": True, "return_num_output_tokens": True}
    if prompt is not None:
        fields["text_input"] = prompt
    else:
        fields["messages"] = json.dumps(messages)
    for name, value in tools.items():
        fields[name] = value if isinstance(value, (bool, str)) else json.dumps(value)
    if sampling:
        fields["sampling_parameters"] = json.dumps(sampling)
    if sampling.get("logprobs") is not None:
        fields["return_logprobs"] = True
    return fields


def as_array(value: Any, batched: bool = False) -> np.ndarray:
    if isinstance(value, bool):
        arr = np.array([value])
    elif isinstance(value, str):
        arr = np.array([value.encode()], dtype=np.object_)
    else:
        arr = np.asarray(value)
    return arr[None] if batched else arr


def grpc_inputs(fields: dict[str, Any], batched: bool = False) -> list:
    """`batched`: the model has max_batch_size > 0, so every input gets a leading batch dimension of 1."""
    import tritonclient.grpc as grpcclient
    inputs = []
    for name, value in fields.items():
        arr = as_array(value, batched)
        tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def _first(value: np.ndarray | None) -> Any:
    if value is None or value.size == 0:
        return None
    item = value.reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else item.item() if hasattr(item, "item") else item


def chunk_from_grpc(result: Any) -> Chunk:
    final = result.get_response().parameters["triton_final_response"].bool_param
    return _chunk({name: _first(result.as_numpy(name)) for name in
                   ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "logprobs")}, final)


def chunk_from_sse(line: str) -> Chunk | None:
    """One `data: {...}` line of HTTP generate_stream (None for other lines); raises on an error event."""
    if not line.startswith("data:"):
        return None
    event = json.loads(line[5:])
    if "error" in event:
        raise classify(event["error"])
    values = {k: (v[0] if isinstance(v, list) and v else v) for k, v in event.items()}
    return _chunk(values, final=bool(values.get("finish_reason")))


def _chunk(values: dict[str, Any], final: bool) -> Chunk:
    count = values.get("num_output_tokens")
    inputs = values.get("num_input_tokens")
    logprobs = values.get("logprobs")
    return Chunk(values.get("text_output") or "", final, values.get("finish_reason") or None,
                 int(inputs) if inputs is not None else None, int(count) if count is not None else None,
                 json.loads(logprobs) if isinstance(logprobs, str) else logprobs)


def http_error(status: int, body: bytes) -> Exception:
    """generate_stream sends its error as one server-sent event; generate as a JSON object."""
    text = body.decode(errors="replace").strip()
    try:
        message = json.loads(text.removeprefix("data:")).get("error", "")
    except (ValueError, AttributeError):
        message = text
    return classify(message or f"HTTP {status}", str(status))
