"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""
from pagedllm.serving.llm import LLMModel as TritonPythonModel  # noqa: F401
