"""The error contract: every server error maps to a code, the code leads the text Triton carries, and the
torch-free client's copy of the codes agrees with the server's and reads them back."""
from __future__ import annotations

import pytest

from pagedllm.errors import (
    EngineDeadError,
    ErrorCode,
    InjectedFault,
    InvalidRequestError,
    OverloadedError,
    RequestRejectedError,
    error_code,
    for_triton,
)
from pagedllm_client import errors as client_errors


def test_the_client_copy_of_the_codes_agrees_with_the_server():
    assert [(c.name, c.value) for c in client_errors.ErrorCode] == [(c.name, c.value) for c in ErrorCode]


@pytest.mark.parametrize("error, code, status, kind", [
    (InvalidRequestError("text_input: is empty"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG",
     client_errors.InvalidRequest),
    (RequestRejectedError("max_tokens: too many"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG",
     client_errors.InvalidRequest),
    (ValueError("seed: not an integer"), ErrorCode.INVALID_ARGUMENT, "INVALID_ARG", client_errors.InvalidRequest),
    (OverloadedError("9 requests waiting; retry later"), ErrorCode.OVERLOADED, "UNAVAILABLE",
     client_errors.Overloaded),
    (EngineDeadError("engine restarting: retry shortly"), ErrorCode.ENGINE_UNAVAILABLE, "UNAVAILABLE",
     client_errors.EngineUnavailable),
    (InjectedFault("boom"), ErrorCode.INTERNAL, "INTERNAL", client_errors.ServerError),
    (KeyError("x"), ErrorCode.INTERNAL, "INTERNAL", client_errors.ServerError),
])
def test_each_error_has_a_code_that_the_client_reads_back(error, code, status, kind):
    assert error_code(error) is code and code.triton_status == status
    read = client_errors.classify(for_triton(code, str(error)), "400")  # HTTP generate answers 400 to all
    assert type(read) is kind and read.code == code and str(read) == str(error)
