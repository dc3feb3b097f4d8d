"""The response fields clients see, shaped once for the llm model and the postprocessing model alike."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pagedllm.engine.sequence import TokenLogprobs
from pagedllm.serving.request import ResponseOptions

RESPONSE_OPTIONS = "response_options"  # the llm -> postprocessing tensor, in the ensemble
RAW_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "logprobs")


@dataclass
class RawResponse:
    """One streamed (or the one non-streamed) response of the engine, before shaping."""

    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprobs] | None
    token_text: Callable[[int], str] = str  # a token id's text, for the logprobs output

    def to_tensors(self, names: tuple[str, ...] = RAW_OUTPUTS) -> dict[str, np.ndarray]:
        """The named outputs only: building tensors no client reads costs time on every token."""
        build = {
            "text_output": lambda: np.array([self.text.encode("utf-8")], dtype=np.object_),
            "finish_reason": lambda: np.array([(self.finish_reason or "").encode()], dtype=np.object_),
            "num_input_tokens": lambda: np.array([self.num_input_tokens], dtype=np.uint32),
            "num_output_tokens": lambda: np.array([self.num_output_tokens], dtype=np.uint32),
            "logprobs": lambda: np.array([json.dumps(self.logprobs_json()).encode()], dtype=np.object_),
        }
        return {name: build[name]() for name in names}

    def logprobs_json(self) -> list[dict]:
        return [_logprob_json(step, self.token_text) for step in self.logprobs or []]


def _logprob_json(step: TokenLogprobs, token_text: Callable[[int], str]) -> dict:
    """One step of the `logprobs` output: the generated token and its top alternatives, each with its text."""
    def entry(token_id: int, logprob: float) -> dict:
        return {"token_id": token_id, "token": token_text(token_id), "logprob": logprob}
    return entry(step.token_id, step.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in step.top.items()]}


def requested_outputs(options: ResponseOptions) -> tuple[str, ...]:
    """text_output always; each other output when its `return_<name>` flag is set."""
    return ("text_output",) + tuple(name for name in RAW_OUTPUTS[1:] if getattr(options, f"return_{name}"))


def prepends_prompt(options: ResponseOptions) -> bool:
    """A non-streamed answer starts with the prompt unless excluded (streamed responses carry only new
    text, as with Triton's vLLM backend)."""
    return not options.stream and not options.exclude_input_in_output and bool(options.prompt_text)


def shape_response(raw: dict[str, np.ndarray], options: ResponseOptions) -> dict[str, np.ndarray]:
    """Keep the fields the client asked for, the prompt prepended where `prepends_prompt`."""
    out = {name: raw[name] for name in requested_outputs(options)}
    if prepends_prompt(options):
        text = options.prompt_text.encode("utf-8") + bytes(raw["text_output"].reshape(-1)[0])
        out["text_output"] = np.array([text], dtype=np.object_)
    return out
