"""Typed client errors, mapped from gRPC status codes and HTTP statuses."""
from __future__ import annotations


class ClientError(Exception):
    """Base of every pagedllm client error."""


class InvalidRequest(ClientError):
    """The server rejected the request as malformed (never retried)."""


class Overloaded(ClientError):
    """The server is overloaded or unavailable; retry later."""


class Cancelled(ClientError):
    """The request was cancelled."""


class Timeout(ClientError):
    """No answer within the client's timeout."""


class ServerError(ClientError):
    """Anything else that went wrong on the server."""


_BY_STATUS = {"StatusCode.INVALID_ARGUMENT": InvalidRequest, "StatusCode.NOT_FOUND": InvalidRequest,
              "StatusCode.UNAVAILABLE": Overloaded, "StatusCode.RESOURCE_EXHAUSTED": Overloaded,
              "StatusCode.CANCELLED": Cancelled, "StatusCode.DEADLINE_EXCEEDED": Timeout,
              "400": InvalidRequest, "404": InvalidRequest, "503": Overloaded, "429": Overloaded}


def from_triton(error: Exception) -> ClientError:
    status = str(getattr(error, "status", lambda: None)() or "")
    message = getattr(error, "message", lambda: str(error))() or str(error)
    return _BY_STATUS.get(status, ServerError)(message)
