"""Accounting: however a request ends, its ticket is settled with the tokens it used, its log line says what
happened without the prompt or the output, and the metrics count it."""
from __future__ import annotations

import json
import logging

from prometheus_client import generate_latest

from pagedllm.gateway.accounting import Accounting, RequestRecord
from pagedllm.gateway.answers import Answer
from pagedllm.gateway.errors import RateLimitError, UpstreamError
from pagedllm.gateway.keys import Limits
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.protocol import parse
from pagedllm.gateway.quotas import KeyQuota
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm_client import Chunk
from tests.gateway.bodies import CHAT

SECRET = "the secret plan"


def accounting() -> Accounting:
    return Accounting(GatewayMetrics(ReplicaPool([], [])))


def test_a_finished_request_settles_logs_and_counts(caplog):
    books = accounting()
    quota = KeyQuota(Limits(tokens_per_minute=1000), clock=lambda: 0.0)
    ticket = quota.admit(500)
    answer = Answer(parse("chat", CHAT | {"messages": [{"role": "user", "content": SECRET}], "n": 2}))
    answer.add(0, Chunk(SECRET, True, "stop", 11, 4))
    answer.add(1, Chunk("short", True, "length", 11, 2))
    record = RequestRecord("req_1", key="team", model="llm")
    record.saw_text()
    with caplog.at_level(logging.INFO, "pagedllm.gateway.access"):
        books.finish(record, ticket, answer, 200)
    line = json.loads(caplog.records[-1].getMessage())
    assert SECRET not in caplog.text
    assert line["prompt_tokens"] == 11 and line["completion_tokens"] == 6 and line["finish_reason"] == "length,stop"
    assert line["status"] == 200 and line["time_to_first_token"] <= line["duration"]
    assert ticket.settled and quota.tokens.level == 1000 - 17
    text = generate_latest(books.metrics.registry).decode()
    assert 'pagedllm_gateway_requests_total{key="team",model="llm",status="200"} 1.0' in text
    assert 'pagedllm_gateway_tokens_total{key="team",kind="completion"} 6.0' in text
    assert "pagedllm_gateway_e2e_request_latency_seconds_count{model=\"llm\"} 1.0" in text


def test_refusals_are_counted_by_reason_and_failures_keep_their_detail_in_the_log(caplog):
    books = accounting()
    books.finish(RequestRecord("req_2"), None, None, 429, RateLimitError("over", None, "rate_limited"))
    with caplog.at_level(logging.INFO, "pagedllm.gateway.access"):
        books.finish(RequestRecord("req_3"), None, None, 500, UpstreamError("KeyError at engine.py:42"))
    line = json.loads(caplog.records[-1].getMessage())
    assert line["error"] == "UpstreamError" and line["error_detail"] == "KeyError at engine.py:42"
    text = generate_latest(books.metrics.registry).decode()
    assert 'pagedllm_gateway_rejections_total{reason="rate_limited"} 1.0' in text
    assert 'reason="UpstreamError"' not in text  # a failure is not a refusal
    assert 'e2e_request_latency_seconds_count{model="-"}' not in text  # latencies are of answered requests
