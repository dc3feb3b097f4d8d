"""The gateway's errors: the request field an upstream error names, and what the client is told of a server
failure."""
from __future__ import annotations

from pagedllm.gateway.errors import UpstreamError, from_upstream, request_field
from pagedllm_client.errors import ServerError, classify


def test_engine_fields_map_to_the_request_field():
    assert request_field("sampling_parameters.temperature") == "temperature"
    assert request_field("text_input") == "prompt" and request_field("sampling_parameters") is None
    assert request_field("max_tokens", {"max_tokens": "max_completion_tokens"}) == "max_completion_tokens"
    error = from_upstream(classify("[invalid_argument field=sampling_parameters.max_tokens] 10000 is over 8192"),
                          {"max_tokens": "max_completion_tokens"})
    assert (error.status, error.param) == (400, "max_completion_tokens")
    assert error.message == "max_completion_tokens: 10000 is over 8192"
    unnamed = from_upstream(classify("[invalid_argument] tools: look like a field"))
    assert unnamed.param is None and unnamed.message == "tools: look like a field"


def test_what_a_server_says_of_its_own_failure_goes_to_the_log_not_the_client():
    error = from_upstream(ServerError("internal: KeyError at /opt/pagedllm/src/engine.py:42"))
    assert isinstance(error, UpstreamError) and error.status == 500 and "/opt" not in str(error.body())
    assert "x-request-id" in error.message and error.detail.endswith("engine.py:42")
