"""The gateway's errors, each with its HTTP status in one table, sent in OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`."""
from __future__ import annotations

import math

from pagedllm_client import ClientError, InvalidRequest, Overloaded, Timeout


class GatewayError(Exception):
    """`param`: the request field at fault, when there is one. `retry_after`: seconds, for 429 and 503."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.retry_after, self.extra_headers = retry_after, headers or {}

    @property
    def status(self) -> int:
        return STATUS[type(self)][0]

    def body(self) -> dict:
        kind = STATUS[type(self)][1]
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return headers


class InvalidRequestError(GatewayError):
    """The request is malformed or asks for something unsupported; `param` names the field."""


class AuthenticationError(GatewayError):
    """No API key, or one the gateway does not know."""


class PermissionDeniedError(GatewayError):
    """The key may not use this model."""


class NotFoundError(GatewayError):
    """No such model, or no such route."""


class RequestTooLargeError(GatewayError):
    """The body is over the gateway's limit."""


class RateLimitError(GatewayError):
    """Over one of the key's quotas; retry after `retry_after` seconds."""


class ServiceUnavailableError(GatewayError):
    """No healthy replica, or the engines shed load; retry after `retry_after` seconds."""


class ClientGoneError(GatewayError):
    """The client disconnected before its answer was ready (logged as 499, nginx's code; nobody reads it)."""


class UpstreamError(GatewayError):
    """The server failed the request. The client is told only that, and the request id; what the server
    said (`detail`: paths, exception text) goes to the gateway's log."""

    def __init__(self, detail: str) -> None:
        super().__init__("the server failed the request; the gateway's log has the detail under this request's "
                         "x-request-id")
        self.detail = detail


STATUS: dict[type[GatewayError], tuple[int, str]] = {
    InvalidRequestError: (400, "invalid_request_error"),
    AuthenticationError: (401, "authentication_error"),
    PermissionDeniedError: (403, "permission_error"),
    NotFoundError: (404, "not_found_error"),
    RequestTooLargeError: (413, "invalid_request_error"),
    RateLimitError: (429, "rate_limit_error"),
    ServiceUnavailableError: (503, "service_unavailable"),
    ClientGoneError: (499, "client_closed_request"),
    UpstreamError: (500, "server_error"),
}

OVERLOAD_RETRY_SECONDS = 1.0
# The llm model's names for fields the OpenAI request names differently; `sampling_parameters` is the
# contract's envelope of OpenAI's sampling fields.
_ENGINE_FIELDS = {"text_input": "prompt", "prompt_token_ids": "prompt"}
_ENVELOPE = "sampling_parameters"


def request_field(engine_field: str, renamed: dict[str, str] | None = None) -> str | None:
    """The request's name for a field the engine named (`sampling_parameters.temperature` -> `temperature`;
    `renamed`: engine field -> the request's name); None for the envelope itself, which the request never
    named."""
    if engine_field == _ENVELOPE:
        return None
    name = engine_field.removeprefix(_ENVELOPE + ".")
    name = _ENGINE_FIELDS.get(name, name)
    return (renamed or {}).get(name, name)


def field_error(field: str | None, reason: str, renamed: dict[str, str] | None = None) -> InvalidRequestError:
    """A 400 for the field the engine (or SamplingParams) named, as the request named it, in `param` and first
    in the message."""
    name = request_field(field, renamed) if field else None
    return InvalidRequestError(f"{name}: {reason}" if name else reason, name)


def from_upstream(error: ClientError, renamed: dict[str, str] | None = None) -> GatewayError:
    """The gateway error for what the client package raised."""
    if isinstance(error, InvalidRequest):
        return field_error(error.field, error.reason, renamed)
    if isinstance(error, Overloaded):
        return ServiceUnavailableError(str(error), code="overloaded", retry_after=OVERLOAD_RETRY_SECONDS)
    if isinstance(error, Timeout):
        return ServiceUnavailableError(str(error), code="timeout", retry_after=OVERLOAD_RETRY_SECONDS)
    return UpstreamError(str(error))
