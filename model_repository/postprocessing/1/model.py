"""Thin on purpose: the logic lives in pagedllm.serving, unit-tested without a server."""
from pagedllm.serving.postprocessing import PostprocessingModel as TritonPythonModel  # noqa: F401
