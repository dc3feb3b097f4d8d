"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""
from pagedllm.serving.generate import GenerateModel as TritonPythonModel  # noqa: F401
