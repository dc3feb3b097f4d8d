"""The ensemble's `postprocessing` model: the response fields clients see, shaped from `llm`'s outputs."""
from __future__ import annotations

import json
from typing import Any

from pagedllm.serving.python_backend import PythonBackend
from pagedllm.serving.request import ResponseOptions
from pagedllm.serving.response import RESPONSE_OPTIONS, shape_response


class PostprocessingModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.backend = PythonBackend(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        """The llm model sends only the outputs the client asked for, and the response options only where
        the prompt is to be prepended: any other response goes back as it came, with no new tensors built
        (building them costs more than the rest of this step)."""
        pb = self.backend.pb
        options = pb.get_input_tensor_by_name(request, RESPONSE_OPTIONS)
        if options is None:
            return pb.InferenceResponse(output_tensors=request.inputs())
        raw = {t.name(): t.as_numpy() for t in request.inputs() if t.name() != RESPONSE_OPTIONS}
        parsed = ResponseOptions(**json.loads(options.as_numpy().reshape(-1)[0]))
        return self.backend.response(shape_response(raw, parsed))
