"""The error contract: every server error maps to a code, the code (and the field at fault, as data) leads the
text Triton carries, and the torch-free client's copy of the codes agrees with the server's and reads them
back."""
from __future__ import annotations

import pytest

from pagedllm.errors import (
    EngineDeadError,
    ErrorCode,
    FieldError,
    InjectedFault,
    InvalidRequestError,
    OverloadedError,
    RequestError,
    RequestRejectedError,
    error_code,
    for_triton,
)
from pagedllm_client import errors as client_errors


def test_the_client_copy_of_the_codes_agrees_with_the_server():
    assert [(c.name, c.value) for c in client_errors.ErrorCode] == [(c.name, c.value) for c in ErrorCode]


@pytest.mark.parametrize("error, code, status, kind", [
    (InvalidRequestError("text_input", "is empty"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG",
     client_errors.InvalidRequest),
    (RequestRejectedError("max_tokens", "too many"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG",
     client_errors.InvalidRequest),
    (FieldError("messages[0].content", "holds <|im_end|>"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG",
     client_errors.InvalidRequest),
    (ValueError("not an integer"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG", client_errors.InvalidRequest),
    (OverloadedError("9 requests waiting; retry later"), ErrorCode.OVERLOADED, "UNAVAILABLE",
     client_errors.Overloaded),
    (EngineDeadError("engine restarting: retry shortly"), ErrorCode.ENGINE_UNAVAILABLE, "UNAVAILABLE",
     client_errors.EngineUnavailable),
    (InjectedFault("boom"), ErrorCode.INTERNAL, "INTERNAL", client_errors.ServerError),
    (KeyError("x"), ErrorCode.INTERNAL, "INTERNAL", client_errors.ServerError),
])
def test_each_error_has_a_code_that_the_client_reads_back(error, code, status, kind):
    assert error_code(error) is code and code.triton_status == status
    read = client_errors.classify(for_triton(RequestError.of(error)), "400")  # HTTP generate answers 400 to all
    assert type(read) is kind and read.code == code and str(read) == str(error)
    assert read.field == getattr(error, "field", None)


def test_the_field_travels_as_data_not_as_words():
    error = RequestError.of(FieldError("sampling_parameters.temperature", "x: -1 is out of range [0, 2]"))
    assert for_triton(error) == "[invalid_argument field=sampling_parameters.temperature] x: -1 is out of range [0, 2]"
    read = client_errors.classify("in ensemble 'ensemble', " + for_triton(error), "400")
    assert (read.field, read.reason) == ("sampling_parameters.temperature", "x: -1 is out of range [0, 2]")
    plain = client_errors.classify(for_triton(RequestError.of(ValueError("tools: look like a field"))), None)
    assert plain.field is None and str(plain) == "tools: look like a field"  # words are never read as a field
    nested = client_errors.classify("[invalid_argument field=messages[2].tool_calls[0]] expected a list", None)
    assert nested.field == "messages[2].tool_calls[0]"


def test_field_errors_cross_processes_whole():
    import pickle
    copy = pickle.loads(pickle.dumps(RequestRejectedError("max_tokens", "too many")))
    assert type(copy) is RequestRejectedError and (copy.field, copy.reason) == ("max_tokens", "too many")
