"""Parsing a Triton request's tensors into a GenerateRequest, for clients of Triton's vLLM backend and
of the TensorRT-LLM ensemble alike. Every error is an InvalidRequestError naming the field."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from pagedllm.engine.lora import NAME as LORA_NAME
from pagedllm.engine.lora import NAME_RULE as LORA_NAME_RULE
from pagedllm.engine.sampling_params import MAX_SEED, SamplingParams
from pagedllm.errors import FieldError, InvalidRequestError
from pagedllm.kv_events import parse_query
from pagedllm.tool_format import ToolUse

NORMALISED_REQUEST = "request"  # the preprocessing -> llm tensor, in the ensemble
# the llm model's: {"action": "load" | "unload", "lora_name": ..., "lora_path": ..., "pinned": false}
LORA_CONTROL = "lora_control"
CACHE_STATE = "cache_state"
MAX_PROMPT_BYTES = 1 << 20
MAX_MESSAGES = 256
MAX_TOOLS = 128  # functions in `tools`, and calls in one message's `tool_calls`
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")
FUNCTION_FIELDS = {"name": str, "description": str, "parameters": dict, "strict": bool}

# TensorRT-LLM ensemble inputs -> SamplingParams fields.
TYPED_INPUTS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                "frequency_penalty": "frequency_penalty", "random_seed": "seed", "min_tokens": "min_tokens"}
# TensorRT-LLM's guided decoding: guided_decoding_guide_type -> the structured_outputs kind its guide is.
GUIDE_TYPES = {"json": "json_object", "json_schema": "json", "regex": "regex", "ebnf_grammar": "grammar"}
FLAGS = ("exclude_input_in_output", "return_finish_reason", "return_num_input_tokens",
         "return_num_output_tokens", "return_logprobs")
_FIELD_TYPES = {f.name: f.type for f in fields(SamplingParams)}



@dataclass
class ResponseOptions:
    stream: bool = False
    exclude_input_in_output: bool = False
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False
    return_logprobs: bool = False
    prompt_text: str = ""

    def to_json(self) -> str:
        """What postprocessing needs to prepend the prompt to a non-streamed answer in the ensemble."""
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> ResponseOptions:
        """Checked as strictly as a client's inputs: the normalised request can come from a client too."""
        if not isinstance(data, dict) or set(data) - {f.name for f in fields(cls)}:
            raise InvalidRequestError(NORMALISED_REQUEST, f"options must be an object with keys among "
                                      f"{[f.name for f in fields(cls)]}")
        for f in fields(cls):
            if f.name in data and type(data[f.name]) is not type(f.default):
                raise InvalidRequestError(NORMALISED_REQUEST, f"options.{f.name} must be a "
                                          f"{type(f.default).__name__}")
        return cls(**data)


@dataclass
class GenerateRequest:
    params: SamplingParams
    options: ResponseOptions
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    input_ids: list[int] | None = None
    tools: ToolUse | None = None  # the functions a chat may call, shown to the model with its messages
    lora_name: str | None = None  # sampling_parameters.lora_name: the adapter it runs with (Triton's vLLM backend)

    def to_json(self) -> str:
        """The normalised request that preprocessing hands to the llm and postprocessing models."""
        return json.dumps({"params": asdict(self.params), "options": asdict(self.options), "lora_name": self.lora_name})

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray], max_prompt_tokens: int | None = None) -> GenerateRequest:
        """The normalised request preprocessing hands to the llm model, and its input_ids."""
        data = _text(inputs, NORMALISED_REQUEST) or ""
        # the prompt, tokenized by preprocessing: named as the engine names it
        input_ids = _input_ids(inputs.get("input_ids", np.zeros(0, np.int32)), max_prompt_tokens, "prompt")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or set(obj) - {"lora_name"} != {"params", "options"}:
                raise ValueError("expected an object with params, options and lora_name")
            params = SamplingParams.from_dict(obj["params"])
        except (ValueError, TypeError) as e:
            raise InvalidRequestError(NORMALISED_REQUEST, f"malformed normalised request ({e})") from None
        return cls(params, ResponseOptions.from_dict(obj["options"]), input_ids=input_ids,
                   lora_name=_lora_name(obj.get("lora_name")))


@dataclass(frozen=True)
class LoRAControl:
    """A request to load (from `path`) or unload LoRA adapter `name` while the model runs, as vLLM's
    /v1/load_lora_adapter and /v1/unload_lora_adapter take it."""
    action: str  # "load" or "unload"
    name: str
    path: str | None = None
    pinned: bool = False  # a load's adapter keeps its slot once it has one


def parse_lora_control(inputs: Mapping[str, np.ndarray]) -> LoRAControl:
    raw = _text(inputs, LORA_CONTROL) or ""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(LORA_CONTROL, f"is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, dict) or data.get("action") not in ("load", "unload") or \
            set(data) - {"action", "lora_name", "lora_path", "pinned"}:
        raise InvalidRequestError(LORA_CONTROL, 'expected {"action": "load", "lora_name": ..., "lora_path": ...} '
                                                'or {"action": "unload", "lora_name": ...}')
    name = _adapter_name(data.get("lora_name"), f"{LORA_CONTROL}.lora_name")
    path = data.get("lora_path")
    if (data["action"] == "load") != isinstance(path, str) or (path is not None and not path):
        raise InvalidRequestError(f"{LORA_CONTROL}.lora_path", "a load needs the adapter's folder; an unload none")
    pinned = data.get("pinned", False)
    if not isinstance(pinned, bool) or (pinned and data["action"] != "load"):
        raise InvalidRequestError(f"{LORA_CONTROL}.pinned", "true or false, for a load")
    return LoRAControl(data["action"], name, path, pinned)


def parse_cache_query(inputs: Mapping[str, np.ndarray]) -> tuple[str | None, int]:
    """A cache_state query's (epoch, since): kv_events.py."""
    try:
        return parse_query(_text(inputs, CACHE_STATE) or "{}")
    except ValueError as e:
        raise InvalidRequestError(CACHE_STATE, str(e)) from None


def parse_request(inputs: Mapping[str, np.ndarray], max_prompt_tokens: int | None = None) -> GenerateRequest:
    """`inputs`: tensor name -> numpy array, as the client sent them (absent optional inputs left out).
    `max_prompt_tokens`: input_ids longer than this are refused before they are read."""
    text = _text(inputs, "text_input")
    messages = _messages(inputs["messages"]) if "messages" in inputs else None
    input_ids = _input_ids(inputs["input_ids"], max_prompt_tokens) if "input_ids" in inputs else None
    fields = (("text_input", text), ("messages", messages), ("input_ids", input_ids))
    given = [name for name, value in fields if value is not None]
    if len(given) != 1:
        raise InvalidRequestError("text_input", "give exactly one of text_input, messages or input_ids"
                                  + (f" (got {', '.join(given)})" if given else ""))
    if text is not None and not text:
        raise InvalidRequestError("text_input", "is empty")
    options = ResponseOptions(stream=_flag(inputs, "stream"), prompt_text=text or "",
                              **{name: _flag(inputs, name) for name in FLAGS})
    params, lora_name = _sampling_params(inputs, options)
    tools = _tool_use(inputs)
    if tools is not None and messages is None:
        raise InvalidRequestError("tools", "only a chat (messages) can be given tools")
    return GenerateRequest(params, options, text=text, messages=messages, input_ids=input_ids, tools=tools,
                           lora_name=lora_name)


def _scalar(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    arr = np.asarray(inputs[name])
    if arr.size != 1:
        raise InvalidRequestError(name, f"expected exactly one value (batch size 1), got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def _decode(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        if len(value) > MAX_PROMPT_BYTES:
            raise InvalidRequestError(name, f"{len(value)} bytes is over the {MAX_PROMPT_BYTES}-byte limit")
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(name, f"is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if isinstance(value, str):
        return value
    raise InvalidRequestError(name, "expected a string")


def _text(inputs: Mapping[str, np.ndarray], name: str) -> str | None:
    return _decode(_scalar(inputs, name), name) if name in inputs else None


def _flag(inputs: Mapping[str, np.ndarray], name: str) -> bool:
    if name not in inputs:
        return False
    value = _scalar(inputs, name)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise InvalidRequestError(name, "expected a BOOL")


def _json(inputs: Mapping[str, np.ndarray], name: str) -> Any:
    raw = _text(inputs, name)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(name, f"is not valid JSON ({e.msg} at position {e.pos})") from None


def _messages(arr: np.ndarray) -> list[dict[str, Any]]:
    """OpenAI's chat messages: text contents, and an assistant's `tool_calls` and `tool` results."""
    messages = _json({"messages": arr}, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "expected a non-empty JSON list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    for i, m in enumerate(messages):
        _message(m, f"messages[{i}]")
    return messages


def _message(m: Any, where: str) -> None:
    if not isinstance(m, dict) or "role" not in m or set(m) - set(MESSAGE_FIELDS):
        raise InvalidRequestError(where, "expected an object with 'role' and 'content' (and optionally "
                                  "name, tool_calls, tool_call_id)")
    if m["role"] not in ROLES:
        raise InvalidRequestError(f"{where}.role", f"{m['role']!r} is not one of {', '.join(ROLES)}")
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant":
            raise InvalidRequestError(f"{where}.tool_calls", "only an assistant's message holds calls")
        if not isinstance(calls, list) or not 0 < len(calls) <= MAX_TOOLS:
            raise InvalidRequestError(f"{where}.tool_calls", f"expected a list of 1 to {MAX_TOOLS} calls")
        for j, call in enumerate(calls):
            _call(call, f"{where}.tool_calls[{j}]")
    content = m.get("content")
    if not isinstance(content, str) and not (content is None and calls):
        raise InvalidRequestError(f"{where}.content", "expected a string (null only beside an assistant's tool_calls)")
    for name in ("name", "tool_call_id"):
        if name in m and not isinstance(m[name], str):
            raise InvalidRequestError(f"{where}.{name}", "expected a string")


def _call(call: Any, where: str) -> None:
    function = call.get("function") if isinstance(call, dict) else None
    if (not isinstance(function, dict) or set(call) - {"id", "type", "function"} or call.get("type") != "function"
            or not isinstance(call.get("id"), str)):
        raise InvalidRequestError(where, "expected {'id': ..., 'type': 'function', 'function': {'name': ..., "
                                  "'arguments': ...}}}")
    if set(function) != {"name", "arguments"} or not all(isinstance(v, str) for v in function.values()):
        raise InvalidRequestError(f"{where}.function", "expected {'name': a string, 'arguments': a JSON string}")


def _tool_use(inputs: Mapping[str, np.ndarray]) -> ToolUse | None:
    """OpenAI's tools, tool_choice and parallel_tool_calls; None without tools or with tool_choice "none"."""
    choice = _text(inputs, "tool_choice") if "tool_choice" in inputs else None
    if "tools" not in inputs:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice", "needs tools")
        return None
    tools = _json(inputs, "tools")
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise InvalidRequestError("tools", f"expected a JSON list of 1 to {MAX_TOOLS} tools")
    functions = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or set(tool) != {"type", "function"} or tool["type"] != "function":
            raise InvalidRequestError(f"tools[{i}]", "expected {'type': 'function', 'function': {...}}")
        for key, value in function.items():
            if not isinstance(value, FUNCTION_FIELDS.get(key, type(None))):
                raise InvalidRequestError(f"tools[{i}].function.{key}", f"expected one of "
                                          f"{', '.join(FUNCTION_FIELDS)}, each of its JSON type")
        if not isinstance(function.get("name"), str) or function["name"] in functions:
            raise InvalidRequestError(f"tools[{i}].function.name", "every function needs a name of its own")
        functions[function["name"]] = function
    parallel = _flag(inputs, "parallel_tool_calls") if "parallel_tool_calls" in inputs else True
    if choice is None or choice in ("auto", "required"):
        return ToolUse(tuple(functions.values()), choice or "auto", parallel)
    if choice == "none":
        return None
    try:
        name = json.loads(choice)["function"]["name"]
    except (ValueError, TypeError, KeyError):
        name = None
    if name not in functions:
        raise InvalidRequestError("tool_choice", f"expected 'none', 'auto', 'required' or "
                                  f"{{'type': 'function', 'function': {{'name': one of {sorted(functions)}}}}}")
    return ToolUse((functions[name],), "named", False)


def _input_ids(arr: np.ndarray, max_tokens: int | None, name: str = "input_ids") -> list[int]:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu":
        raise InvalidRequestError(name, "expected an integer tensor")
    if max_tokens is not None and arr.size > max_tokens:
        raise InvalidRequestError(name, f"{arr.size} tokens is over the model's max_model_len {max_tokens}")
    return arr.reshape(-1).tolist()


def _lora_name(value: Any) -> str | None:
    return None if value is None else _adapter_name(value, "sampling_parameters.lora_name")


def _adapter_name(value: Any, field: str) -> str:
    if not (isinstance(value, str) and LORA_NAME.match(value)):
        raise InvalidRequestError(field, LORA_NAME_RULE)
    return value


def _sampling_params(inputs: Mapping[str, np.ndarray], options: ResponseOptions) -> tuple[SamplingParams, str | None]:
    """The sampling parameters, and the adapter sampling_parameters names (lora_name, as Triton's vLLM backend)."""
    data = _sampling_json(inputs)
    lora_name = _lora_name(data.pop("lora_name", None))
    source = {key: f"sampling_parameters.{key}" for key in data}  # field -> what the client called it
    for name, target in TYPED_INPUTS.items():
        if name in inputs:
            data[target], source[target] = _typed_number(inputs, name), name
    if "stop_words" in inputs:  # TensorRT-LLM clients send "" for "none"
        words = [_decode(w, "stop_words") for w in np.asarray(inputs["stop_words"]).reshape(-1)]
        data["stop"], source["stop"] = [w for w in words if w], "stop_words"
    if "guided_decoding_guide_type" in inputs:
        data["structured_outputs"], source["structured_outputs"] = _guide(inputs), "guided_decoding_guide"
    if options.return_logprobs and data.get("logprobs") is None:
        data["logprobs"] = 0
    try:
        return SamplingParams.from_dict(data), lora_name
    except FieldError as e:  # named as the client sent it
        raise InvalidRequestError(source.get(e.field, e.field), e.reason) from None


def _guide(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    kind = _text(inputs, "guided_decoding_guide_type")
    if kind not in GUIDE_TYPES:
        raise InvalidRequestError("guided_decoding_guide_type", f"{kind!r} is not one of {', '.join(GUIDE_TYPES)}")
    if kind == "json":
        return {"json_object": True}
    guide = _text(inputs, "guided_decoding_guide")
    if not guide:
        raise InvalidRequestError("guided_decoding_guide", f"is required with guided_decoding_guide_type {kind}")
    return {GUIDE_TYPES[kind]: guide}


def _sampling_json(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    if "sampling_parameters" not in inputs:
        return {}
    raw = _decode(_scalar(inputs, "sampling_parameters"), "sampling_parameters")
    try:
        data = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise InvalidRequestError("sampling_parameters", f"is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("sampling_parameters", "expected a JSON object")
    return {k: _coerce(k, v) for k, v in data.items()}


def _coerce(key: str, value: Any) -> Any:
    """Triton's vLLM backend accepts numbers and booleans sent as strings ("0.7", "true"): so do we."""
    kind = str(_FIELD_TYPES.get(key, ""))
    if not isinstance(value, str) or kind.startswith("list") or kind == "":
        return value
    try:
        if kind.startswith("bool"):
            return {"true": True, "false": False}[value.strip().lower()]
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except (ValueError, KeyError):
        raise InvalidRequestError(f"sampling_parameters.{key}",
                                  f"{value!r} is not a valid {kind.split(' ')[0]}") from None
    return value


def _typed_number(inputs: Mapping[str, np.ndarray], name: str) -> int | float:
    value = _scalar(inputs, name)
    if isinstance(value, (np.floating, float)):
        if not math.isfinite(float(value)):
            raise InvalidRequestError(name, "must be a finite number")
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, (bool, np.bool_)):
        if name == "random_seed" and not 0 <= int(value) <= MAX_SEED:
            raise InvalidRequestError(name, "out of range")
        return int(value)
    raise InvalidRequestError(name, "expected a number")
