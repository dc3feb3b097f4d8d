"""A torch-free client for pagedllm on Triton: `Client(url).stream(...)` yields text as it is generated."""
from pagedllm_client.client import Client, Completion
from pagedllm_client.errors import Cancelled, ClientError, InvalidRequest, Overloaded, ServerError, Timeout

__all__ = ["Client", "Completion", "ClientError", "InvalidRequest", "Overloaded", "Cancelled", "Timeout", "ServerError"]
