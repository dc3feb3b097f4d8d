"""A key's quotas on a fake clock."""
from __future__ import annotations

import json

import pytest

from pagedllm.gateway.errors import RateLimitError
from pagedllm.gateway.keys import Limits, load_keys
from pagedllm.gateway.quotas import KeyQuota, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_per_minute():
    clock = Clock()
    bucket = TokenBucket(60, clock)
    bucket.take(60)
    assert bucket.wait(6) == pytest.approx(6.0)
    clock.now = 3.0
    assert bucket.wait(6) == pytest.approx(3.0)
    clock.now = 1000.0
    assert bucket.wait(60) == 0 and bucket.wait(61) > 0  # capped at capacity


def test_quota_refuses_names_the_limit_and_settles_tokens():
    clock = Clock()
    quota = KeyQuota(Limits(requests_per_minute=2, tokens_per_minute=100, max_concurrent_requests=2), clock)
    a = quota.admit(60)
    with pytest.raises(RateLimitError, match="tokens_per_minute") as e:
        quota.admit(60)
    assert e.value.retry_after == pytest.approx(12.0) and e.value.headers()["retry-after"] == "12"
    a.settle(10)  # 50 of the 60 reserved come back
    b = quota.admit(60)
    with pytest.raises(RateLimitError, match="requests_per_minute"):
        quota.admit(1)
    clock.now = 30.0
    with pytest.raises(RateLimitError, match="max_concurrent_requests"):
        KeyQuota(Limits(max_concurrent_requests=1), clock).admit(1).quota.admit(1)
    b.settle(200)  # a prompt longer than estimated is charged
    assert quota.tokens.level < 0
    with pytest.raises(RateLimitError) as big:
        quota.admit(101)
    assert big.value.headers()["x-should-retry"] == "false"
    assert quota.headers()["x-ratelimit-limit-tokens"] == "100"


def test_a_request_without_max_tokens_reserves_the_rest_of_the_context():
    quota = KeyQuota(Limits(tokens_per_minute=10_000), Clock())
    open_ended = quota.admit(100, up_to=8192)  # the prompt, up to the model's context
    assert open_ended.reserved == 8192
    with pytest.raises(RateLimitError, match="tokens_per_minute"):
        quota.admit(100, up_to=8192)
    open_ended.settle(150)  # what it used; the rest comes back
    small = KeyQuota(Limits(tokens_per_minute=1_000), Clock())
    assert small.admit(100, up_to=8192).reserved == 1_000  # a full bucket still admits it
    assert KeyQuota(Limits(max_concurrent_requests=1), Clock()).admit(100, up_to=8192).reserved == 100


def test_a_key_without_a_concurrency_limit_gets_the_default_one(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": "0" * 64}]}))
    quota = KeyQuota(load_keys(path)[0].limits)
    tickets = [quota.admit(10) for _ in range(Limits().max_concurrent_requests)]
    with pytest.raises(RateLimitError, match="max_concurrent_requests"):
        quota.admit(10)
    tickets[0].settle(10)
    assert quota.admit(10) is not None
