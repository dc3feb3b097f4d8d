"""A torch-free client for pagedllm on Triton: `Client(url).stream(...)` yields text as it is generated;
`AsyncClient` does the same for asyncio. Retries on overload, a circuit breaker, typed errors."""
from pagedllm_client.aio import AsyncClient
from pagedllm_client.client import Client
from pagedllm_client.errors import (
    Cancelled,
    CircuitOpen,
    ClientError,
    EngineUnavailable,
    ErrorCode,
    InvalidRequest,
    Overloaded,
    ServerError,
    Timeout,
)
from pagedllm_client.protocol import Chunk, Completion
from pagedllm_client.resilience import NO_RETRY, CircuitBreaker, RetryPolicy

__all__ = ["Client", "AsyncClient", "Chunk", "Completion", "RetryPolicy", "NO_RETRY", "CircuitBreaker", "ClientError",
           "ErrorCode", "InvalidRequest", "Overloaded", "EngineUnavailable", "CircuitOpen", "Cancelled", "Timeout",
           "ServerError"]
