"""What cancelling does on each path, measured: tokens the engine still generates after the client left.

Triton 2.51 cancels a decoupled model's request when its gRPC stream is cancelled, but does not pass
cancellation into the steps of a running ensemble: there the engine finishes the request (bounded by
its max_tokens). The measured figures are written to perf/out/cancellation.json and quoted in the README."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import metric, num_tokens, stream, wait_for

pytestmark = pytest.mark.integration
MAX_TOKENS = 200
OUT = Path(__file__).resolve().parents[2] / "perf" / "out"


def _generated(server) -> float:
    return metric(server, "pagedllm_generation_tokens_total")


def _settle(server) -> None:
    assert wait_for(lambda: metric(server, "pagedllm_num_requests_running") == 0, timeout=60)
    time.sleep(0.2)  # metrics are flushed every 50 ms


def _grpc_cancel(server, model: str) -> int:
    """Tokens received before cancelling the stream after its 5th response."""
    fields = {"text_input": "List every prime number you know:", "return_num_output_tokens": True,
              "sampling_parameters": {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True}}
    responses, error = stream(server.grpc_url, model, fields, stop_after=5)
    assert error is None
    return num_tokens(responses)


def _http_close(server, model: str) -> int:
    """Tokens received before closing the connection after the 5th event."""
    body = {"text_input": "List every prime number you know:", "stream": True, "return_num_output_tokens": True,
            "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True})}
    events = []
    with requests.post(f"http://{server.http_url}/v2/models/{model}/generate_stream", json=body, stream=True,
                       timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
            if len(events) >= 5:
                break  # closing the connection here
    return sum(int(e["num_output_tokens"]) for e in events)


@pytest.mark.parametrize("path", ["grpc/llm", "grpc/ensemble", "http/llm", "http/ensemble"])
def test_tokens_wasted_after_cancel(server, path):
    protocol, model = path.split("/")
    _settle(server)
    before = _generated(server)
    received = (_grpc_cancel if protocol == "grpc" else _http_close)(server, model)
    cancelled_at = time.monotonic()
    _settle(server)
    wasted = _generated(server) - before - received
    record = {"path": path, "received_tokens": received, "wasted_tokens": wasted, "max_tokens": MAX_TOKENS,
              "seconds_to_free": round(time.monotonic() - cancelled_at, 2)}
    OUT.mkdir(exist_ok=True)
    with open(OUT / "cancellation.json", "a") as f:
        f.write(json.dumps(record) + "\n")
    assert wasted <= MAX_TOKENS  # the bound on every path: the request's own max_tokens
    if path == "grpc/llm":
        # cancelled inside the engine within one cancellation poll of the stub (50 ms: 8-9 tokens at batch 1's 170
        # tok/s) and the step in flight, counted here in engine.json's stream_interval of 4: 5, 9 or 13 (10 held
        # while decode ran at 110-160 tok/s)
        assert wasted <= 4 * 4, record
