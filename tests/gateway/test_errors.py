"""The gateway's errors: the field an upstream error names; what the client is told of a server failure."""
from __future__ import annotations

from pagedllm.gateway.errors import UpstreamError, from_upstream, param_of


def test_engine_messages_map_to_the_request_field():
    assert param_of("sampling_parameters.temperature: -1 is out of range") == "temperature"
    assert param_of("max_tokens: 10000 with a prompt of 20 tokens is over max_model_len 8192") == "max_tokens"
    assert param_of("messages[0].role: 'x' is not one of system") == "messages[0].role"
    assert param_of("no field here") is None


def test_what_a_server_says_of_its_own_failure_goes_to_the_log_not_the_client():
    from pagedllm_client.errors import ServerError
    error = from_upstream(ServerError("internal: KeyError at /opt/pagedllm/src/engine.py:42"))
    assert isinstance(error, UpstreamError) and error.status == 500 and "/opt" not in str(error.body())
    assert "x-request-id" in error.message and error.detail.endswith("engine.py:42")
