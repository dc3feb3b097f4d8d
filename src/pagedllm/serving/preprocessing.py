"""The ensemble's `preprocessing` model: validation, chat template and tokenization in front of `llm`."""
from __future__ import annotations

from typing import Any

import numpy as np

from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.errors import InvalidRequestError
from pagedllm.serving.python_backend import PythonBackend
from pagedllm.serving.request import NORMALISED_REQUEST, parse_request
from pagedllm.serving.tokenization import tokenize_request
from pagedllm.weights import resolve_model_path


class PreprocessingModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.backend = PythonBackend(args)
        self.tokenizer = load_tokenizer(resolve_model_path(self.backend.parameter("model")))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            req = parse_request(self.backend.inputs(request))
            ids = tokenize_request(self.tokenizer, req)
        except InvalidRequestError as e:
            return self.backend.error(str(e))
        return self.backend.response({"input_ids": np.array(ids, dtype=np.int32),
                                      NORMALISED_REQUEST: np.array([req.to_json().encode()], dtype=np.object_)})
