"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""
from pagedllm.serving.triton_models import UnaryModel as TritonPythonModel  # noqa: F401
