"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""
from pagedllm.serving.preprocessing import PreprocessingModel as TritonPythonModel  # noqa: F401
