"""Structured output in OpenAI's API: `response_format`, vLLM's extra-body `structured_outputs` and `guided_*`
fields, and tool calls (`tools` with `tool_choice` "required" or a named function), each turned into the one
`structured_outputs` constraint the engine takes; and a constrained answer turned back into `tool_calls`.

The engine's chat templates here do not render tools, and there is no parser for tool calls in free text, so
`tool_choice` "auto" is refused: the gateway describes the tools in a system message and constrains the
answer to a call."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.engine.sampling_params import LEGACY_STRUCTURED_OUTPUTS
from pagedllm.gateway.errors import InvalidRequestError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Function(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


@dataclass
class ToolCallPlan:
    """The answer is a call of `name` (a named tool_choice), or of one of `names` ("required")."""
    names: list[str]
    named: bool


def constraint(extras: dict[str, Any], response_format: ResponseFormat | None, tools: list[Tool] | None,
               tool_choice: str | dict[str, Any] | None) -> tuple[dict[str, Any] | None, ToolCallPlan | None]:
    """The engine's `structured_outputs` for a request, and the tool call it answers with, if any.
    `extras`: the vLLM fields the request set (`structured_outputs`, `guided_*`)."""
    given = {"response_format": _from_response_format(response_format) if response_format else None,
             "structured_outputs": extras.get("structured_outputs"),
             **{k: {kind: extras[k]} for k, kind in LEGACY_STRUCTURED_OUTPUTS.items() if k in extras}}
    tool_plan, tool_constraint = _from_tools(tools, tool_choice)
    given["tools"] = tool_constraint
    named = [name for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise InvalidRequestError(f"{named[1]}: give one output constraint, got {' and '.join(named)}", named[1])
    return (given[named[0]] if named else None), tool_plan


def _from_response_format(fmt: ResponseFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise InvalidRequestError("response_format.json_schema.schema: is required for type json_schema",
                                  "response_format.json_schema.schema")
    return {"json": fmt.json_schema.json_schema}


def _from_tools(tools: list[Tool] | None, choice: str | dict[str, Any] | None
                ) -> tuple[ToolCallPlan | None, dict[str, Any] | None]:
    if choice == "none" or (not tools and choice is None):
        return None, None
    if not tools:
        raise InvalidRequestError("tool_choice: needs tools", "tool_choice")
    by_name = {tool.function.name: tool.function for tool in tools}
    if choice is None or choice == "auto":
        raise InvalidRequestError("tool_choice: 'auto' needs a chat template that renders tools and a parser for "
                                  "the calls it writes, which this server's models lack; send tool_choice "
                                  "'required' or {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if choice == "required":
        calls = [_call_schema(f) for f in by_name.values()]
        return ToolCallPlan(list(by_name), named=False), {"json": {"anyOf": calls} if len(calls) > 1 else calls[0]}
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name not in by_name:
        raise InvalidRequestError(f"tool_choice: expected 'none', 'auto', 'required' or "
                                  f"{{'type': 'function', 'function': {{'name': one of {sorted(by_name)}}}}}",
                                  "tool_choice")
    return ToolCallPlan([name], named=True), {"json": _parameters(by_name[name])}


def _parameters(function: Function) -> dict[str, Any]:
    return function.parameters or {"type": "object", "properties": {}}


def _call_schema(function: Function) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": function.name}, "arguments": _parameters(function)}}


def tools_message(tools: list[Tool], plan: ToolCallPlan) -> str:
    """A system message that tells the model the functions it calls and how its answer is read."""
    described = [{"name": t.function.name, "description": t.function.description or "",
                  "parameters": _parameters(t.function)} for t in tools if t.function.name in plan.names]
    how = (f"Call {plan.names[0]}: reply with its arguments as one JSON object." if plan.named else
           'Call one of them: reply with one JSON object {"name": <function name>, "arguments": {...}}.')
    return f"You can call these functions:\n{json.dumps(described, indent=2)}\n{how}"


def tool_calls(plan: ToolCallPlan, text: str) -> list[dict[str, Any]]:
    """OpenAI's `tool_calls` for the text of a complete constrained answer."""
    if plan.named:
        name, arguments = plan.names[0], text
    else:
        call = json.loads(text)
        name, arguments = call["name"], json.dumps(call["arguments"], ensure_ascii=False)
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": name, "arguments": arguments}}]
