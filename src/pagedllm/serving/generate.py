"""The `generate` model: a non-decoupled front for clients that cannot stream (gRPC ModelInfer rejects
decoupled models). It forwards each request to its target (the ensemble) through BLS and returns the one
answer."""
from __future__ import annotations

from typing import Any

import numpy as np

from pagedllm.errors import ErrorCode, RequestError
from pagedllm.serving.python_backend import PythonBackend


class GenerateModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.backend = PythonBackend(args)
        self.target = self.backend.parameter("target") or "ensemble"

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        pb = self.backend.pb
        inputs = self.backend.inputs(request)
        inputs["stream"] = np.array([False])
        bls = pb.InferenceRequest(model_name=self.target, requested_output_names=self.backend.output_names,
                                  inputs=[pb.Tensor(n, v) for n, v in inputs.items()])
        answer = None
        for response in bls.exec(decoupled=True):
            if response.has_error():
                return pb.InferenceResponse(output_tensors=[], error=response.error())
            if response.output_tensors():
                answer = response
        if answer is None:
            return self.backend.error(RequestError(ErrorCode.INTERNAL, f"{self.target} returned no answer"))
        return pb.InferenceResponse(output_tensors=answer.output_tensors())
