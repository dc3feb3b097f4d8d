"""Every error the server side raises (engine, serving models, launcher), and the one table that maps each
to the Triton status code a client sees. The gateway's errors are in gateway/errors.py, the client's in
pagedllm_client/errors.py."""
from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The Triton status codes pagedllm answers with (the names of `pb_utils.TritonError`'s codes)."""
    INVALID_ARG = "INVALID_ARG"  # the request: its message names the field
    UNAVAILABLE = "UNAVAILABLE"  # retry: overloaded, or the engine is restarting
    INTERNAL = "INTERNAL"  # the engine failed


class InvalidRequestError(ValueError):
    """The request's tensors are malformed; the message names the field."""


class RequestRejectedError(ValueError):
    """The request can never be served as given (the message names the field)."""


class OverloadedError(RuntimeError):
    """Admission is full (waiting requests or queued prompt tokens): refused at once, retry later."""


class EngineDeadError(RuntimeError):
    """The engine is not running (stopped, restarting or down); the request may be retried."""


class InjectedFault(RuntimeError):
    """Raised by EngineConfig.fault_injection, to test that failures stay contained."""


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
TRITON_STATUS: dict[type[BaseException], ErrorCode] = {
    InvalidRequestError: ErrorCode.INVALID_ARG,
    RequestRejectedError: ErrorCode.INVALID_ARG,
    ValueError: ErrorCode.INVALID_ARG,
    OverloadedError: ErrorCode.UNAVAILABLE,
    EngineDeadError: ErrorCode.UNAVAILABLE,
}


def error_code(error: BaseException) -> ErrorCode:
    """The status code for `error`: the nearest class in TRITON_STATUS, else INTERNAL."""
    for cls in type(error).__mro__:
        if cls in TRITON_STATUS:
            return TRITON_STATUS[cls]
    return ErrorCode.INTERNAL
