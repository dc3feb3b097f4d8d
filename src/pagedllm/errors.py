"""Every error the server side raises (engine, serving models, launcher), the one table that maps each to
its ErrorCode, and how a code travels over Triton. The gateway's errors are in gateway/errors.py, the client's in
pagedllm_client/errors.py."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    """What went wrong, in one word that every side reads: the engine's deltas carry it, Triton's error
    responses lead with it (`for_triton`), and the client and the gateway decide retries and HTTP status from
    it, never from the words. pagedllm_client.errors.ErrorCode is the client's copy (tests/test_errors.py)."""
    INVALID_ARGUMENT = "invalid_argument"  # the request: the error names the field, where there is one
    OVERLOADED = "overloaded"  # admission is full: retry later
    ENGINE_UNAVAILABLE = "engine_unavailable"  # the engine process died, restarts or stays down: retry elsewhere
    INTERNAL = "internal"  # the server failed; its log has the detail

    @property
    def triton_status(self) -> str:
        """The `pb_utils.TritonError` code this answers with (HTTP 400, 503, 500 where Triton maps them)."""
        return {ErrorCode.INVALID_ARGUMENT: "INVALID_ARG", ErrorCode.INTERNAL: "INTERNAL"}.get(self, "UNAVAILABLE")


class FieldError(ValueError):
    """A request field is wrong: `field` names it as the request did (`sampling_parameters.temperature`,
    `messages[0].content`), `reason` says what is wrong and what to do. Its text is `field: reason`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def __reduce__(self):  # pickled with both parts (the default would pass only the joined text)
        return type(self), (self.field, self.reason)


class InvalidRequestError(FieldError):
    """The request's tensors are malformed."""


class RequestRejectedError(FieldError):
    """The request can never be served as given."""


@dataclass(frozen=True)
class RequestError:
    """A request's failure on its way to the client: the engine's deltas carry it across the process
    boundary, and Triton's error text is made from it (`for_triton`)."""
    code: ErrorCode
    message: str  # without the field, when there is one
    field: str | None = None  # the request field at fault

    @classmethod
    def of(cls, error: BaseException) -> RequestError:
        if isinstance(error, FieldError):
            return cls(error_code(error), error.reason, error.field)
        return cls(error_code(error), str(error))

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def for_triton(error: RequestError) -> str:
    """An error's text as Triton carries it: `[overloaded] 9 requests waiting ...`, and with the field as data,
    `[invalid_argument field=sampling_parameters.temperature] -1 is out of range`. Triton 2.51 gives no status
    inside a gRPC stream and answers every model error on HTTP generate with 400, so the code travels in the
    text, first, where pagedllm_client.errors.classify reads it."""
    field = f" field={error.field}" if error.field else ""
    return f"[{error.code}{field}] {error.message}"


class OverloadedError(RuntimeError):
    """Admission is full (waiting requests or queued prompt tokens): refused at once, retry later."""


class EngineDeadError(RuntimeError):
    """The engine is not running (stopped, restarting or down); the request may be retried."""


class InjectedFault(RuntimeError):
    """Raised by the faults a test injects (engine/faults.py), to show that failures stay contained."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture is not one the engine implements."""


class ModelConfigError(ValueError):
    """A model's config.pbtxt or engine.json cannot work as written (the message says what to change)."""


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local directory nor a file the embedded model provides."""


class KernelsUnavailable(RuntimeError):
    """The CPU kernels cannot run here (the message says why)."""


class CacheDirError(PermissionError):
    """The cache folder could be written by someone else; the message says which part and what to do."""


class TritonNotFoundError(FileNotFoundError):
    """No tritonserver binary to launch."""


# Looked up along the exception's class hierarchy: a ValueError not named here is a validation error too.
ERROR_CODES: dict[type[BaseException], ErrorCode] = {
    InvalidRequestError: ErrorCode.INVALID_ARGUMENT,
    RequestRejectedError: ErrorCode.INVALID_ARGUMENT,
    ValueError: ErrorCode.INVALID_ARGUMENT,
    OverloadedError: ErrorCode.OVERLOADED,
    EngineDeadError: ErrorCode.ENGINE_UNAVAILABLE,
}


def error_code(error: BaseException) -> ErrorCode:
    """The code for `error`: the nearest class in ERROR_CODES, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    return ErrorCode.INTERNAL
