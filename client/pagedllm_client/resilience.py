"""Retries with exponential backoff and full jitter, and a circuit breaker: pure logic, shared by the
synchronous and the asynchronous client. Only Overloaded (overload or unavailability) is retried."""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedllm_client.errors import CircuitOpen, ClientError, Overloaded, ServerError, Timeout
from pagedllm_client.protocol import PROTOCOLS


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # 1 means no retries
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: must be at least 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("initial_backoff, max_backoff: must not be negative")

    def should_retry(self, error: ClientError, attempt: int) -> bool:
        """`attempt` counts from 1: the attempt that just failed."""
        return attempt < self.max_attempts and isinstance(error, Overloaded) and not isinstance(error, CircuitOpen)

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier^(attempt-1))]."""
        return rng() * min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))


NO_RETRY = RetryPolicy(max_attempts=1)
DEFAULT_RETRY = RetryPolicy()
DEFAULT_URL = "localhost:8001"  # Triton's gRPC port on this machine


class _OwnBreaker:
    """ClientSettings' default `breaker`: a CircuitBreaker of the client's own (None: no breaker)."""


@dataclass
class CircuitBreaker:
    """Closed: calls go through. After `failure_threshold` failures in a row it opens: calls fail at once
    with CircuitOpen for `reset_timeout` seconds. Then it is half-open: one trial call goes through; its
    success closes the circuit, its failure opens it again. Invalid requests are not failures."""
    failure_threshold: int = 5
    reset_timeout: float = 10.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    opened_at: float | None = None
    _trial_in_flight: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.reset_timeout else "open"

    def before_call(self) -> None:
        with self._lock:
            state = self.state
            if state == "closed":
                return
            if state == "open" or self._trial_in_flight:
                wait = self.reset_timeout - (self.clock() - self.opened_at)
                raise CircuitOpen(f"circuit open after {self.failures} failures in a row; "
                                  f"not sent (retry in {max(wait, 0):.1f}s)")
            self._trial_in_flight = True

    def record(self, error: ClientError | None) -> None:
        """The outcome of a call that before_call let through."""
        failed = isinstance(error, (Overloaded, ServerError, Timeout)) and not isinstance(error, CircuitOpen)
        with self._lock:
            self._trial_in_flight = False
            if not failed:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.opened_at is not None or self.failures >= self.failure_threshold:
                self.opened_at = self.clock()


class ClientSettings:
    """What Client and AsyncClient share: where to send, how long to wait, and how to fail."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "ensemble", protocol: str = "grpc",
                 timeout: float = 120.0, retry: RetryPolicy | None = DEFAULT_RETRY,
                 breaker: CircuitBreaker | None | type[_OwnBreaker] = _OwnBreaker, model_version: str = "") -> None:
        """`retry=None` sends each request once; `breaker=None` never refuses a call (a gateway that makes
        its own choices does both)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.url, self.model, self.protocol, self.timeout = url, model, protocol, timeout
        self.model_version = model_version
        self.retry = retry or NO_RETRY
        self.breaker = CircuitBreaker() if breaker is _OwnBreaker else breaker
        self.attempts = 0  # every attempt sent, retries included (for tests and logs)
        self._lock = threading.Lock()
        self._init_transport()

    def _init_transport(self) -> None:
        """Connections are made lazily; subclasses set up where they keep them."""

    def _begin_attempt(self) -> None:
        if self.breaker is not None:
            self.breaker.before_call()
        with self._lock:
            self.attempts += 1

    def _retry_delay(self, error: ClientError, attempt: int, started: bool) -> float:
        """After a failed attempt: the backoff before the next one, or raise `error` when it is not retried
        (a stream that already yielded text is never restarted)."""
        self._record(error)
        if started or not self.retry.should_retry(error, attempt):
            raise error
        return self.retry.backoff(attempt)

    def _record(self, error: ClientError | None) -> None:
        """An attempt's outcome, for the breaker (None: it succeeded, or the caller left while it answered)."""
        if self.breaker is not None:
            self.breaker.record(error)
