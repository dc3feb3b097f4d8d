"""SamplingParams: vLLM's names and defaults, validated up front with errors that name the field."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from pagedllm.errors import FieldError

MAX_STOP_STRINGS = 32
MAX_SEED = 2 ** 64 - 1
MAX_CHOICES = 256
# A constraint's budget, checked before it is compiled: its text (a JSON schema as JSON), and an EBNF
# grammar's rules. Compile time has its own bound (grammar_worker.py).
MAX_CONSTRAINT_BYTES = 64 << 10
MAX_GRAMMAR_RULES = 1024
# The names vLLM's clients sent before `structured_outputs`, and the kind each one is.
LEGACY_STRUCTURED_OUTPUTS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                             "guided_grammar": "grammar"}


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names): exactly one of a JSON schema, a regular expression, a list of
    choices, an EBNF grammar, any JSON object, or an xgrammar structural tag (free text with constrained
    sections, as tool calls are: a JSON string). structured_output.py compiles it."""
    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise FieldError("structured_outputs", "give exactly one of json, regex, choice, grammar, json_object, "
                             "structural_tag"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise FieldError("structured_outputs.json", "must be a JSON schema (an object, or a string holding one)")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise FieldError(f"structured_outputs.{name}", "must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice or len(self.choice)
                                        > MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice)):
            raise FieldError("structured_outputs.choice", f"must be a list of 1 to {MAX_CHOICES} non-empty strings")
        if self.json_object is not None and self.json_object is not True:
            raise FieldError("structured_outputs.json_object", "must be true when given")
        size = len(self.source.encode("utf-8", "surrogatepass"))
        if size > MAX_CONSTRAINT_BYTES:
            raise FieldError(f"structured_outputs.{self.kind}", f"{size} bytes is over the {MAX_CONSTRAINT_BYTES}-byte "
                             "limit for a constraint")
        if self.grammar is not None and self.grammar.count("::=") > MAX_GRAMMAR_RULES:
            raise FieldError("structured_outputs.grammar", f"more than {MAX_GRAMMAR_RULES} rules")

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name) is not None)

    @property
    def source(self) -> str:
        """The constraint as the text the compiler takes (a JSON schema as JSON, choices as a grammar)."""
        if self.json is not None:
            return self.json if isinstance(self.json, str) else json.dumps(self.json)
        if self.json_object:  # OpenAI's json_object: an object, not any JSON value
            return '{"type": "object"}'
        if self.choice is not None:
            return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in self.choice)
        return next(s for s in (self.regex, self.grammar, self.structural_tag) if s is not None)

    @classmethod
    def from_dict(cls, data: Any) -> StructuredOutputsParams:
        if not isinstance(data, dict):
            raise FieldError("structured_outputs",
                             "must be an object such as {\"json\": {...}} or {\"regex\": \"...\"}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise FieldError(f"structured_outputs.{unknown[0]}", f"unknown keys {unknown}; known keys: "
                             f"{[f.name for f in fields(cls)]}")
        return cls(**data)


def move_legacy_structured_outputs(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` keys moved
    under `structured_outputs`, as SamplingParams takes them."""
    legacy = {key: data[key] for key in LEGACY_STRUCTURED_OUTPUTS if key in data}
    if not legacy:
        return data
    if "structured_outputs" in data or len(legacy) > 1:
        raise FieldError("structured_outputs", f"give one constraint, got {', '.join(sorted(legacy))}"
                         + (" and structured_outputs" if "structured_outputs" in data else ""))
    (key, value), = legacy.items()
    rest = {k: v for k, v in data.items() if k != key}
    return {**rest, "structured_outputs": {LEGACY_STRUCTURED_OUTPUTS[key]: value}}


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
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and self.min_tokens:
            raise FieldError("min_tokens", "cannot be combined with structured_outputs, whose grammar decides "
                             "where the output may end")
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
            raise FieldError("stop", "must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise FieldError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, list):
            raise FieldError("stop_token_ids", "must be a list of token ids")
        for token in self.stop_token_ids:
            check_int("stop_token_ids", token, low=0)
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, "must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        if not isinstance(data, dict):
            raise FieldError("sampling_parameters", "must be a JSON object")
        data = move_legacy_structured_outputs(data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:  # named as a field of its own, so that each API names it as its request did
            raise FieldError(unknown[0], f"unknown keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise FieldError("sampling_parameters", f"{e}") from None


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(name, f"must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise FieldError(name, f"{value} is out of range [{low}, {high if high is not None else 'inf'}]")


def _check_float(name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FieldError(name, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bracket = "(" if low_open else "["
        raise FieldError(name, f"{value} is out of range {bracket}{low}, {high if high is not None else 'inf'}]")
