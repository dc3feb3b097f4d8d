"""Typed client errors, and the one function that maps a server's error to them.

Triton 2.51 gives no status code for an error inside a gRPC stream, and HTTP generate answers every model
error with 400, so the message is classified too: pagedllm prefixes the errors worth retrying."""
from __future__ import annotations


class ClientError(Exception):
    """Base of every pagedllm client error."""


class InvalidRequest(ClientError):
    """The server rejected the request as malformed; the message names the field (never retried)."""


class Overloaded(ClientError):
    """The server is overloaded or unavailable; retry later (the client does, with backoff)."""


class CircuitOpen(Overloaded):
    """The client's circuit breaker is open after repeated failures: not sent, try again later."""


class Cancelled(ClientError):
    """The request was cancelled."""


class Timeout(ClientError):
    """No answer within the client's timeout (the request is cancelled on the server)."""


class ServerError(ClientError):
    """Anything else that went wrong on the server."""


_BY_STATUS: dict[str, type[ClientError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidRequest, "StatusCode.NOT_FOUND": InvalidRequest,
    "StatusCode.UNAVAILABLE": Overloaded, "StatusCode.RESOURCE_EXHAUSTED": Overloaded,
    "StatusCode.CANCELLED": Cancelled, "StatusCode.DEADLINE_EXCEEDED": Timeout,
    "StatusCode.INTERNAL": ServerError, "StatusCode.UNKNOWN": ServerError,
    "400": InvalidRequest, "404": InvalidRequest, "429": Overloaded, "503": Overloaded,
    "500": ServerError, "502": Overloaded, "504": Timeout,
}
# Retryable whatever the status says (lowercase substrings of the message). ENGINE_DOWN_MARKS: the llm
# model's engine process died or is restarting (the gateway then skips that replica for a while).
ENGINE_DOWN_MARKS = ("engine died:", "engine restarting:")
_UNAVAILABLE_MARKS = ("overloaded:", "engine loop is not running", "is not ready", "stub process is not healthy",
                      "failed to connect", "connection refused", "socket closed", *ENGINE_DOWN_MARKS)
_SERVER_MARKS = ("engine failed:", "internal:")


def classify(message: str, status: str | None = None) -> ClientError:
    """The typed error for a server's message and (gRPC or HTTP) status, if it gave one."""
    text = message.lower()
    if any(mark in text for mark in _UNAVAILABLE_MARKS):
        return Overloaded(message)
    if any(mark in text for mark in _SERVER_MARKS):
        return ServerError(message)
    if status:
        return _BY_STATUS.get(status, ServerError)(message)
    return InvalidRequest(message)  # a stream error with no code: the model's validation, naming the field


def from_triton(error: Exception) -> ClientError:
    """From a tritonclient InferenceServerException, a grpc.RpcError (tritonclient's asyncio streams raise
    those when the connection breaks), or anything with a message."""
    status = error.status() if callable(getattr(error, "status", None)) else None
    status = status or (error.code() if callable(getattr(error, "code", None)) else None)
    message = error.message() if callable(getattr(error, "message", None)) else None
    message = message or (error.details() if callable(getattr(error, "details", None)) else None)
    return classify(message or str(error), str(status) if status else None)
