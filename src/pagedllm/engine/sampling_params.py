"""SamplingParams: vLLM's names and defaults, validated up front with errors that name the field."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

MAX_STOP_STRINGS = 32
MAX_SEED = 2 ** 64 - 1


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: up to the model's context (max_model_len), as vLLM's chat API
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0)
        _check_float("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        check_int("top_k", self.top_k, low=-1)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            check_int("seed", self.seed, low=0, high=MAX_SEED)
        check_int("min_tokens", self.min_tokens, low=0, high=self.max_tokens)  # high None: no bound
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, low=0, high=20)
        self._check_stops()

    def _check_stops(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop: must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, list):
            raise ValueError("stop_token_ids: must be a list of token ids")
        for token in self.stop_token_ids:
            check_int("stop_token_ids", token, low=0)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        if not isinstance(data, dict):
            raise ValueError("sampling_parameters: must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"sampling_parameters: unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"sampling_parameters: {e}") from None


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}: {value} is out of range [{low}, {high if high is not None else 'inf'}]")


def _check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}: {value} is out of range {bracket}{low}, {high if high is not None else 'inf'}]")
