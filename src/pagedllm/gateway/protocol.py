"""OpenAI's request bodies, validated with errors that name the field, and turned into the engine
requests that answer them: one per choice (`n` per prompt)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pagedllm.engine.sampling_params import LEGACY_STRUCTURED_OUTPUTS, SamplingParams
from pagedllm.errors import FieldError
from pagedllm.gateway.errors import InvalidRequestError, field_error
from pagedllm.gateway.structured import ResponseFormat, constraint
from pagedllm.gateway.tools import Function, Tool, ToolCallPlan, plan_tools
from pagedllm.serving.request import MAX_MESSAGES, MAX_PROMPT_BYTES
from pagedllm.tool_format import chat_bytes

MAX_STOP = 4
MAX_TOOLS = 128
MAX_CHOICES = 16  # n
MAX_STREAMS = 64  # prompts x n: each choice is one engine stream, and they are built before admission
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat runs to the context's end
UNSUPPORTED = {
    "logit_bias": "logit_bias", "suffix": "suffix", "best_of": "best_of",
    "audio": "audio output", "modalities": "audio output", "prediction": "predicted outputs",
}
# Sampling fields passed to the engine under the same name, when the request sets them.
SAMPLING_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                   "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's extra-body constraint, and its older names:
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        return stops


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an earlier answer's calls, sent back with their results
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # the legacy shape of one call

    def for_engine(self) -> dict[str, Any]:
        """The message as the engine's chat rendering takes it (tool_format.py): OpenAI's current shape, the
        legacy roles and call mapped onto it."""
        calls = [c.model_dump() for c in self.tool_calls or []]
        if self.function_call:
            calls.append({"id": "call_0", "type": "function", "function": self.function_call.model_dump()})
        if calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant's message holds calls")
        if self.content is None and not calls:
            raise ValueError("content: is required unless the message is an assistant's tool_calls")
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        fields = {"name": self.name, "tool_calls": calls or None, "tool_call_id": self.tool_call_id}
        return {"role": role, "content": self.content} | {k: v for k, v in fields.items() if v is not None}

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[dict[str, Any]] | None) -> str | None:
        if content is None or isinstance(content, str):
            return content
        for i, part in enumerate(content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError(f"part {i}: only {{'type': 'text', 'text': ...}} parts are supported, "
                                 f"got type {part.get('type')!r}")
        return "\n".join(part["text"] for part in content)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Function] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # the legacy tools
    function_call: str | dict[str, Any] | None = None  # the legacy tool_choice


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


@dataclass
class Choice:
    """One engine request: the `index`-th choice of the answer."""
    index: int
    prompt: str | None
    messages: list[dict[str, Any]] | None
    sampling: dict[str, Any]


@dataclass
class Plan:
    """What the engine is asked, and how the answer is shaped."""
    kind: Literal["chat", "completion"]
    model: str
    choices: list[Choice]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool
    max_tokens: int | None
    renamed: dict[str, str] = field(default_factory=dict)  # engine field -> the request's name for it
    tool_call: ToolCallPlan | None = None  # the answer is a tool call
    user: str | None = None  # the end user the client names: keeps a user's requests on one replica when all else ties


def parse(kind: Literal["chat", "completion"], body: Any) -> Plan:
    """The plan for a decoded JSON body, or InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", None)
    for key in body:
        if key in UNSUPPORTED:
            raise InvalidRequestError(f"{key}: {UNSUPPORTED[key]} is not supported by this server", key)
    schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        raise field_error_of(e) from None
    plan = _chat_plan(request) if kind == "chat" else _completion_plan(request)
    _check_sampling(plan)
    return plan


def field_error_of(error: ValidationError, within: str = "") -> InvalidRequestError:
    """A validation error as a 400 naming the field (under `within`, where the body was a part)."""
    first = error.errors()[0]
    loc = [part for part in first["loc"] if part not in ("str", "list[str]", "list[dict[str,any]]")]
    param = (within + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)).lstrip(".") or None
    message = "unknown field (not part of OpenAI's API or not supported)" if first["type"] == "extra_forbidden" \
        else first["msg"]
    return InvalidRequestError(f"{param}: {message}" if param else message, param)


def _sampling(request: _Common, max_tokens: int | None, structured: dict[str, Any] | None) -> dict[str, Any]:
    values = {name: getattr(request, name) for name in SAMPLING_FIELDS if getattr(request, name) is not None}
    values["max_tokens"] = max_tokens
    if request.stop:
        values["stop"] = request.stop
    if structured is not None:
        values["structured_outputs"] = structured
    return values


def _constraint(request: _Common, tool_plan: ToolCallPlan | None = None) -> tuple[dict[str, Any] | None,
                                                                                  dict[str, str]]:
    """The engine's structured_outputs, and the request's name for the constraint."""
    extras = {name: getattr(request, name) for name in ("structured_outputs", *LEGACY_STRUCTURED_OUTPUTS)
              if getattr(request, name) is not None}
    structured = constraint(extras, request.response_format, tool_plan)
    if structured is None or "structured_outputs" in extras:
        return structured, {}
    kind = next(iter(structured))
    source = ("functions" if tool_plan.legacy else "tools") if tool_plan else next(iter(extras), None)
    if request.response_format is not None:
        source = "response_format.json_schema.schema" if kind == "json" else "response_format"
    return structured, {f"structured_outputs.{kind}": source}


def _stream_flags(request: _Common) -> bool:
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError("stream_options: only allowed when stream is true", "stream_options")
    return bool(request.stream_options and request.stream_options.include_usage)


def _fan_out(prompts: list[tuple[str | None, list[dict[str, Any]] | None]], request: _Common,
             sampling: dict[str, Any]) -> list[Choice]:
    """n choices per prompt; with a seed, choice i of a prompt gets seed + i (distinct but reproducible)."""
    choices = []
    for prompt, messages in prompts:
        for i in range(request.n):
            seeded = sampling if request.seed is None else {**sampling, "seed": request.seed + i}
            choices.append(Choice(len(choices), prompt, messages, seeded))
    return choices


def _chat_plan(request: ChatCompletionRequest) -> Plan:
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError("top_logprobs: only allowed when logprobs is true", "top_logprobs")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    tool_plan = plan_tools(request.tools, request.tool_choice, request.parallel_tool_calls, request.functions,
                           request.function_call)
    structured, constraint_names = _constraint(request, tool_plan)
    sampling = _sampling(request, max_tokens, structured)
    if request.logprobs:
        sampling["logprobs"] = request.top_logprobs or 0
    messages = _messages(request.messages)
    renamed = {"logprobs": "top_logprobs", "prompt": "messages", "text_input": "messages", **constraint_names}
    if request.max_completion_tokens is not None:
        renamed["max_tokens"] = "max_completion_tokens"
    return Plan("chat", request.model, _fan_out([(None, messages)], request, sampling), request.n, request.stream,
                _stream_flags(request), request.logprobs, False, max_tokens, renamed, tool_plan, request.user)


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        try:
            out.append(m.for_engine())
        except ValueError as e:
            field = str(e).split(":")[0]
            raise InvalidRequestError(f"messages[{i}].{e}", f"messages[{i}].{field}") from None
    _check_bytes("messages", chat_bytes(out))
    return out


def _check_streams(prompts: int, n: int) -> None:
    if prompts * n > MAX_STREAMS:
        field = "prompt" if n == 1 else "n"
        raise InvalidRequestError(f"{field}: {prompts} prompts x n {n} are {prompts * n} choices; at most "
                                  f"{MAX_STREAMS} per request (send the rest in more requests)", field)


def _check_bytes(field: str, size: int) -> None:
    if size > MAX_PROMPT_BYTES:
        raise InvalidRequestError(f"{field}: {size} bytes of text is over the {MAX_PROMPT_BYTES}-byte limit", field)


def _completion_plan(request: CompletionRequest) -> Plan:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if not prompts or not all(prompts):
        raise InvalidRequestError("prompt: must be a non-empty string or a list of non-empty strings", "prompt")
    _check_streams(len(prompts), request.n)
    for p in prompts:
        _check_bytes("prompt", len(p.encode()))
    if request.echo and request.logprobs is not None:
        raise InvalidRequestError("echo: logprobs of the prompt are not supported; drop echo or logprobs", "echo")
    max_tokens = request.max_tokens if request.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    structured, constraint_names = _constraint(request)
    sampling = _sampling(request, max_tokens, structured)
    if request.logprobs is not None:
        sampling["logprobs"] = request.logprobs
    choices = _fan_out([(p, None) for p in prompts], request, sampling)
    return Plan("completion", request.model, choices, request.n, request.stream, _stream_flags(request),
                request.logprobs is not None, request.echo, max_tokens, constraint_names, user=request.user)


def _check_sampling(plan: Plan) -> None:
    """The engine's own validation, run here first so a bad field costs no round trip (same message)."""
    try:
        for choice in (plan.choices[0], plan.choices[-1]):  # they differ only in the seed
            SamplingParams.from_dict(dict(choice.sampling))
    except FieldError as e:
        raise field_error(e.field, e.reason, plan.renamed) from None


def decode_body(raw: bytes) -> Any:
    try:
        body = json.loads(raw.decode("utf-8"))
        # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer takes: found here, in C
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"the request body is not valid JSON ({e.msg} at line {e.lineno} "
                                  f"column {e.colno})") from None
    except RecursionError:
        raise InvalidRequestError("the request body nests arrays or objects too deeply") from None
    except UnicodeEncodeError:
        try:
            path = _surrogate_path(body) or None
        except RecursionError:
            path = None
        raise InvalidRequestError(f"{path or 'the body'}: holds a lone surrogate escape (\\ud800-\\udfff), which "
                                  "is not text", path) from None
    return body


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in the body the first string that is not Unicode text sits (walked only when there is one)."""
    if isinstance(value, str):
        return None if _is_text(value) else path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        here = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{shown}" if path else shown
        if isinstance(key, str) and not _is_text(key):
            return here
        found = _surrogate_path(item, here)
        if found is not None:
            return found
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
