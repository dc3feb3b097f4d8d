"""Admission: the key, a bounded JSON body, the model (served names, the key's list, a healthy replica needed)
and the quota taken before any replica sees the request. Real Starlette requests, no server."""
from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from pagedllm.gateway.accounting import RequestRecord
from pagedllm.gateway.admission import DRAIN_FACTOR, Admission, read_body
from pagedllm.gateway.config import GatewayConfig, Route
from pagedllm.gateway.errors import GatewayError
from pagedllm.gateway.keys import ApiKey, KeyRing, Limits, digest
from pagedllm.gateway.protocol import parse
from pagedllm.gateway.quotas import KeyQuota
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.gateway.responses_api import ResponseStore
from tests.gateway.bodies import CHAT

KEY = ApiKey("team", digest("sk-team"), models=frozenset({"llm", "chat"}), limits=Limits(tokens_per_minute=10_000))


def request(body: bytes, content_type: str = "application/json", key: str | None = "sk-team",
            parts: int = 1) -> Request:
    headers = [(b"content-type", content_type.encode())] + ([(b"authorization", f"Bearer {key}".encode())]
                                                            if key else [])
    size = max(1, len(body) // parts)
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    received = []

    async def receive() -> dict:
        i = len(received)
        received.append(i)
        return {"type": "http.request", "body": pieces[i] if i < len(pieces) else b"",
                "more_body": i + 1 < len(pieces)}
    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers},
                      receive)
    request.state.received = received
    return request


def admission(served: set[str] = frozenset({"llm"}), healthy: bool = True, **config) -> Admission:
    pool = ReplicaPool(["a:1"], ["llm"])
    pool.replicas[0].healthy, pool.replicas[0].models = healthy, set(served)
    keys = KeyRing([KEY])
    return Admission(GatewayConfig(["a:1"], **config), pool, keys, {KEY.name: KeyQuota(KEY.limits)},
                     ResponseStore(8, 60))


def refused(coroutine) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        asyncio.run(coroutine)
    return e.value


def test_an_admitted_request_knows_its_key_model_answer_and_ticket():
    record = RequestRecord("req_1")
    admitted = asyncio.run(admission(served_model_names={"chat": "llm"}).admit(
        "chat", request(json.dumps(CHAT | {"model": "chat", "max_tokens": 5}).encode()), record))
    assert (admitted.key, admitted.model, record.key, record.model) == (KEY, "llm", "team", "llm")
    assert admitted.answer.plan.model == "chat" and admitted.ticket.reserved > 5


def test_the_body_is_json_and_bounded():
    assert asyncio.run(read_body(request(b'{"a": 1}', parts=4), 8)) == b'{"a": 1}'
    error = refused(read_body(request(b"{}", "text/plain"), 8))
    assert error.status == 400 and error.code == "unsupported_content_type"
    error = refused(read_body(request(b"x" * 9), 8))
    assert error.status == 413 and error.code == "request_too_large"
    huge = request(b"x" * 8 * DRAIN_FACTOR * 4, parts=64)
    refused(read_body(huge, 8))
    assert len(huge.state.received) < 64  # cut after DRAIN_FACTOR times the limit, not read to the end


@pytest.mark.parametrize("body, served, healthy, status, param", [
    (CHAT | {"model": "nope"}, {"llm"}, True, 404, "model"),
    (CHAT | {"model": "llm_tiny"}, {"llm", "llm_tiny"}, True, 403, "model"),  # not in the key's list
    (CHAT, {"llm"}, False, 503, None),
])
def test_models_that_are_missing_forbidden_or_unready_are_refused(body, served, healthy, status, param):
    error = refused(admission(served, healthy).admit("chat", request(json.dumps(body).encode()), RequestRecord("r")))
    assert (error.status, error.param) == (status, param)


def test_unauthenticated_requests_get_nowhere():
    assert refused(admission().admit("chat", request(json.dumps(CHAT).encode(), key=None),
                                     RequestRecord("r"))).status == 401


def test_the_quota_reserves_max_tokens_per_choice_or_the_rest_of_the_context():
    gate = admission(max_model_len={"llm": 2048})
    bounded = gate.reserve(KEY, parse("chat", CHAT | {"max_tokens": 100, "n": 3}), "llm")
    assert bounded.reserved % 3 == 0 and bounded.reserved > 300  # each choice: its prompt and 100 tokens
    bounded.settle(0)
    open_ended = gate.reserve(KEY, parse("chat", CHAT), "llm")
    assert open_ended.reserved == 2048  # the prompt may run to the end of the context
    assert gate.reserve(ApiKey("other", "0" * 64), parse("chat", CHAT), "llm") is None  # no quota for the key


def test_an_adapter_is_routed_to_its_base_model_and_the_key_must_list_it():
    record = RequestRecord("req_2")
    gate = admission(lora_adapters={"chat": "llm", "sql": "llm"}, served_model_names={})
    admitted = asyncio.run(gate.admit("chat", request(json.dumps(CHAT | {"model": "chat"}).encode()), record))
    assert admitted.route == Route("llm", "chat") and (record.model, record.adapter) == ("llm", "chat")
    error = refused(gate.admit("chat", request(json.dumps(CHAT | {"model": "sql"}).encode()), RequestRecord("r")))
    assert (error.status, error.param) == (403, "model")  # the key lists llm, not the adapter sql
