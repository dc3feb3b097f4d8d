"""Per-key quotas: token buckets for requests and tokens per minute, and a count of concurrent requests.
Tokens are reserved at admission (the prompt's estimate plus max_tokens for every choice, or up to the rest of
the model's context where max_tokens is not given) and settled
when the request ends: the unused part comes back, a prompt longer than estimated is charged.
Single-threaded by design: the gateway runs on one asyncio loop."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedllm.gateway.errors import RateLimitError
from pagedllm.gateway.keys import Limits

BYTES_PER_TOKEN = 4  # the admission estimate of a prompt's tokens, settled with the engine's count


@dataclass
class TokenBucket:
    """Holds up to `capacity`, refilled continuously at `capacity` per minute; may go below zero when a
    settlement charges more than was reserved (the next requests then wait)."""
    capacity: float
    clock: Callable[[], float] = time.monotonic
    level: float = field(init=False)
    _at: float = field(init=False)

    def __post_init__(self) -> None:
        self.level, self._at = self.capacity, self.clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self._at) * self.capacity / 60.0)
        self._at = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` is available (0: now)."""
        self._refill()
        missing = amount - self.level
        return max(0.0, missing * 60.0 / self.capacity)

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


def estimate_tokens(text_bytes: int) -> int:
    return math.ceil(text_bytes / BYTES_PER_TOKEN)


class KeyQuota:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.requests = TokenBucket(limits.requests_per_minute, clock) if limits.requests_per_minute else None
        self.tokens = TokenBucket(limits.tokens_per_minute, clock) if limits.tokens_per_minute else None
        self.in_flight = 0

    def admit(self, reserve_tokens: int, up_to: int | None = None) -> Ticket:
        """Take one request and `reserve_tokens` tokens, or raise RateLimitError naming the limit. `up_to`:
        reserve that many if the key's bucket can ever hold them, else as many as it holds when full."""
        concurrent = self.limits.max_concurrent_requests
        if concurrent is not None and self.in_flight >= concurrent:
            raise self._refused("max_concurrent_requests", f"{concurrent} requests already in flight", 1.0)
        if up_to is not None and self.tokens is not None:
            reserve_tokens = max(reserve_tokens, min(up_to, int(self.tokens.capacity)))
        if self.tokens is not None and reserve_tokens > self.tokens.capacity:
            raise RateLimitError(f"rate limit tokens_per_minute: this request needs {reserve_tokens} tokens (prompt "
                                 "estimate plus max_tokens per choice), more than the key's "
                                 f"{int(self.tokens.capacity)} per minute; lower max_tokens or n", None,
                                 "request_too_large_for_quota",
                                 headers={"x-should-retry": "false"} | self.headers())
        for name, bucket, amount in (("requests_per_minute", self.requests, 1),
                                     ("tokens_per_minute", self.tokens, reserve_tokens)):
            wait = bucket.wait(amount) if bucket else 0.0
            if wait > 0:
                raise self._refused(name, f"{amount} more would be over {int(bucket.capacity)} per minute", wait)
        for bucket, amount in ((self.requests, 1), (self.tokens, reserve_tokens)):
            if bucket:
                bucket.take(amount)
        self.in_flight += 1
        return Ticket(self, reserve_tokens)

    def _refused(self, limit: str, why: str, retry_after: float) -> RateLimitError:
        return RateLimitError(f"rate limit {limit} reached: {why}; retry in {retry_after:.1f}s", None,
                              f"rate_limit_{limit}", retry_after, self.headers())

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this key has."""
        out: dict[str, str] = {}
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            bucket.wait(0)  # refills
            reset = (bucket.capacity - bucket.level) * 60.0 / bucket.capacity
            out |= {f"x-ratelimit-limit-{kind}": str(int(bucket.capacity)),
                    f"x-ratelimit-remaining-{kind}": str(max(0, int(bucket.level))),
                    f"x-ratelimit-reset-{kind}": f"{reset:.3f}s"}
        return out


@dataclass
class Ticket:
    """One admitted request: `settle` with what it used, once, when it ends."""
    quota: KeyQuota
    reserved: int
    settled: bool = False

    def settle(self, used_tokens: int) -> None:
        if self.settled:
            return
        self.settled = True
        self.quota.in_flight -= 1
        if self.quota.tokens is not None:
            self.quota.tokens.give(self.reserved - used_tokens)
