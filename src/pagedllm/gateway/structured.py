"""Structured output in OpenAI's API: `response_format`, vLLM's extra-body `structured_outputs` and `guided_*`
fields, and tool calls (tools.py), each turned into the one `structured_outputs` constraint the engine takes."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.engine.sampling_params import LEGACY_STRUCTURED_OUTPUTS
from pagedllm.gateway import tools
from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.gateway.tools import ToolCallPlan


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


def constraint(extras: dict[str, Any], response_format: ResponseFormat | None,
               tool_plan: ToolCallPlan | None) -> dict[str, Any] | None:
    """The engine's `structured_outputs` for a request. `extras`: the vLLM fields the request set
    (`structured_outputs`, `guided_*`)."""
    given = {"response_format": _from_response_format(response_format) if response_format else None,
             "structured_outputs": extras.get("structured_outputs"),
             **{k: {kind: extras[k]} for k, kind in LEGACY_STRUCTURED_OUTPUTS.items() if k in extras}}
    given["tools"] = tools.constraint(tool_plan) if tool_plan else None
    named = [name for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise InvalidRequestError(f"{named[1]}: give one output constraint, got {' and '.join(named)}", named[1])
    return given[named[0]] if named else None


def _from_response_format(fmt: ResponseFormat) -> dict[str, Any] | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise InvalidRequestError("response_format.json_schema.schema: is required for type json_schema",
                                  "response_format.json_schema.schema")
    return {"json": fmt.json_schema.json_schema}
