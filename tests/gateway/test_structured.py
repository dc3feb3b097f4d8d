"""OpenAI's response_format, vLLM's structured_outputs and guided_* fields, and tools: each becomes the one
constraint the engine takes, and two at once are refused naming the second."""
from __future__ import annotations

import pytest

from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.gateway.structured import ResponseFormat, constraint
from pagedllm.gateway.tools import Function, Tool, plan_tools

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def fmt(**body) -> ResponseFormat:
    return ResponseFormat.model_validate(body)


def test_each_way_of_asking_becomes_the_engines_constraint():
    assert constraint({}, None, None) is None
    assert constraint({}, fmt(type="text"), None) is None
    assert constraint({}, fmt(type="json_object"), None) == {"json_object": True}
    assert constraint({}, fmt(type="json_schema", json_schema={"name": "x", "schema": SCHEMA}), None) == {
        "json": SCHEMA}
    assert constraint({"guided_regex": "[0-9]+"}, None, None) == {"regex": "[0-9]+"}
    assert constraint({"structured_outputs": {"choice": ["a"]}}, None, None) == {"choice": ["a"]}
    plan = plan_tools([Tool(type="function", function=Function(name="f"))], "required", None)
    assert set(constraint({}, None, plan)) == {"structural_tag"}


def test_two_constraints_at_once_are_refused_naming_the_second():
    with pytest.raises(InvalidRequestError) as e:
        constraint({"guided_regex": "a+"}, fmt(type="json_object"), None)
    assert e.value.param == "guided_regex" and "response_format and guided_regex" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        constraint({}, fmt(type="json_schema", json_schema={"name": "x"}), None)
    assert e.value.param == "response_format.json_schema.schema"
