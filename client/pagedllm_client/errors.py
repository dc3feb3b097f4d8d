"""Typed client errors, and the one function that maps a server's error to them.

Triton 2.51 gives no status code for an error inside a gRPC stream, and HTTP generate answers every model
error with 400, so pagedllm's models lead each error's text with its code (`[overloaded] ...`), and a request
error with the field at fault (`[invalid_argument field=sampling_parameters.temperature] ...`); errors from
Triton itself or the network carry none and are classified by their status and words."""
from __future__ import annotations

import enum
import re


class ErrorCode(enum.StrEnum):
    """The server's codes (pagedllm.errors.ErrorCode, copied: this package imports nothing of the server's)."""
    INVALID_ARGUMENT = "invalid_argument"
    OVERLOADED = "overloaded"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    INTERNAL = "internal"


class ClientError(Exception):
    """Base of every pagedllm client error; `code` is the server's, where it gave one. `field` is the request
    field at fault, where the server named one, and `reason` what it said of it; the text is then
    `field: reason`."""

    def __init__(self, message: str = "", code: ErrorCode | None = None, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code, self.field, self.reason = code, field, message


class InvalidRequest(ClientError):
    """The server rejected the request as malformed; the message names the field (never retried)."""


class Overloaded(ClientError):
    """The server is overloaded or unavailable; retry later (the client does, with backoff)."""


class EngineUnavailable(Overloaded):
    """The model's engine process died or is restarting: retry, on another replica where there is one."""


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
_BY_CODE: dict[ErrorCode, type[ClientError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidRequest, ErrorCode.OVERLOADED: Overloaded,
    ErrorCode.ENGINE_UNAVAILABLE: EngineUnavailable, ErrorCode.INTERNAL: ServerError,
}
# The code (and the field, if any) leads the text; Triton puts "in ensemble 'name', " before an ensemble
# step's error, which the client drops: the field names what the client sent.
_CODED = re.compile(r"^(?:in ensemble '[^']*', )?\[(" + "|".join(ErrorCode) + r")(?: field=(\S+?))?\] ")
# Triton's and the network's own words for a model or server that cannot answer now (no code): retryable.
_UNAVAILABLE_MARKS = ("is not ready", "stub process is not healthy", "failed to connect", "connection refused",
                      "socket closed")


def classify(message: str, status: str | None = None) -> ClientError:
    """The typed error for a server's message and (gRPC or HTTP) status, if it gave one: by the code that
    leads a pagedllm model's message (shown without it), else by the status and Triton's words."""
    coded = _CODED.match(message)
    if coded is not None:
        code = ErrorCode(coded.group(1))
        return _BY_CODE[code](message[coded.end():], code, coded.group(2))
    if any(mark in message.lower() for mark in _UNAVAILABLE_MARKS):
        return Overloaded(message)
    if status:
        return _BY_STATUS.get(status, ServerError)(message)
    return InvalidRequest(message)  # a stream error with no code or status: a validation error


def from_triton(error: Exception) -> ClientError:
    """From a tritonclient InferenceServerException, a grpc.RpcError (tritonclient's asyncio streams raise
    those when the connection breaks), or anything with a message."""
    status = error.status() if callable(getattr(error, "status", None)) else None
    status = status or (error.code() if callable(getattr(error, "code", None)) else None)
    message = error.message() if callable(getattr(error, "message", None)) else None
    message = message or (error.details() if callable(getattr(error, "details", None)) else None)
    return classify(message or str(error), str(status) if status else None)
