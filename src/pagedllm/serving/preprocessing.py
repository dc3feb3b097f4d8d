"""The ensemble's `preprocessing` model: validation, chat template and tokenization in front of `llm`."""
from __future__ import annotations

from typing import Any

import numpy as np

from pagedllm.engine.config import load_model_config
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.errors import FieldError, RequestError
from pagedllm.serving.python_backend import PythonBackend
from pagedllm.serving.request import NORMALISED_REQUEST, parse_request
from pagedllm.serving.tokenization import PromptLimit, tokenize_request
from pagedllm.weights import resolve_model_path


class PreprocessingModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.backend = PythonBackend(args)
        path = resolve_model_path(self.backend.parameter("model"))
        self.tokenizer = load_tokenizer(path)
        # the llm model checks the engine's own max_model_len; this bound only keeps oversized text from the
        # tokenizer (a parameter where engine.json sets a longer max_model_len than the model's positions)
        max_tokens = self.backend.parameter("max_model_len") or load_model_config(path).max_position_embeddings
        self.prompt_limit = PromptLimit.for_tokenizer(self.tokenizer, int(max_tokens))

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(r) for r in requests]

    def _one(self, request: Any) -> Any:
        try:
            req = parse_request(self.backend.inputs(request), self.prompt_limit.max_tokens)
            ids = tokenize_request(self.tokenizer, req, self.prompt_limit)
        except FieldError as e:
            return self.backend.error(RequestError.of(e))
        return self.backend.response({"input_ids": np.array(ids, dtype=np.int32),
                                      NORMALISED_REQUEST: np.array([req.to_json().encode()], dtype=np.object_)})
