"""Shaping responses (serving/response.py): the prompt prepended, logprobs, the ensemble's response options."""
from __future__ import annotations

import json

import numpy as np

from pagedllm.engine.sequence import TokenLogprobs
from pagedllm.serving.request import ResponseOptions, parse_request
from pagedllm.serving.response import RawResponse, prepends_prompt, shape_response


def s(text: str | bytes) -> np.ndarray:
    return np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_)


def test_shape_response_prepends_prompt_only_when_not_streaming_and_not_excluded():
    logprobs = [TokenLogprobs(5, -0.1, {5: -0.1, 7: -2.5})]
    raw = RawResponse(" world", "stop", 3, 1, logprobs, lambda t: f"<{t}>").to_tensors()
    req = parse_request({"text_input": s("Hello"), "return_logprobs": np.array([True])})
    out = shape_response(raw, req.options)
    assert out["text_output"][0] == b"Hello world" and set(out) == {"text_output", "logprobs"}
    assert json.loads(out["logprobs"][0]) == [{"token_id": 5, "token": "<5>", "logprob": -0.1, "top_logprobs": [
        {"token_id": 5, "token": "<5>", "logprob": -0.1}, {"token_id": 7, "token": "<7>", "logprob": -2.5}]}]
    req.options.stream = True
    assert shape_response(raw, req.options)["text_output"][0] == b" world"


def test_echoed_options_shape_a_non_streamed_answer_as_the_llm_model_would():
    req = parse_request({"text_input": s("Hello " * 500), "return_finish_reason": np.array([True])})
    raw = RawResponse(" world", "stop", 3, 1, None).to_tensors()
    assert prepends_prompt(req.options)  # the only case in which the llm model sends the echo
    assert shape_response(raw, ResponseOptions(**json.loads(req.options.to_json()))) == shape_response(raw, req.options)
