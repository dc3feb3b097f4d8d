"""Parsing OpenAI requests into plans, and the errors that name the request's field."""
from __future__ import annotations

import json

import pytest

from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.gateway.protocol import decode_body, parse
from tests.gateway.bodies import CHAT, TOOL


def test_chat_plan_maps_openai_fields_to_engine_sampling():
    plan = parse("chat", CHAT | {"max_tokens": 5, "max_completion_tokens": 9, "stop": "x", "n": 3, "seed": 4,
                                 "top_k": 2, "logprobs": True, "top_logprobs": 2})
    assert [c.index for c in plan.choices] == [0, 1, 2] and [c.sampling["seed"] for c in plan.choices] == [4, 5, 6]
    assert plan.choices[0].sampling == {"top_k": 2, "max_tokens": 9, "stop": ["x"], "logprobs": 2, "seed": 4}
    assert plan.renamed["max_tokens"] == "max_completion_tokens"
    assert parse("chat", CHAT).choices[0].sampling == {"max_tokens": None}  # to the end of the context


def test_content_parts_and_developer_role():
    plan = parse("chat", {"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert plan.choices[0].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]


def test_completions_fan_out_over_prompts_and_default_to_16_tokens():
    plan = parse("completion", {"model": "m", "prompt": ["a", "b"], "n": 2})
    assert [(c.index, c.prompt) for c in plan.choices] == [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert plan.choices[0].sampling["max_tokens"] == 16


@pytest.mark.parametrize("body, param", [
    (CHAT | {"temperature": -1}, "temperature"),
    (CHAT | {"temperature": "hot"}, "temperature"),
    (CHAT | {"max_tokens": 0}, "max_tokens"),
    (CHAT | {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT | {"n": 0}, "n"), (CHAT | {"n": 17}, "n"),
    (CHAT | {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    (CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT | {"top_logprobs": 2}, "top_logprobs"),
    (CHAT | {"tools": []}, "tools"), (CHAT | {"response_format": {"type": "xml"}}, "response_format.type"),
    (CHAT | {"response_format": {"type": "json_schema"}}, "response_format.json_schema.schema"),
    (CHAT | {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    (CHAT | {"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    (CHAT | {"tools": [TOOL], "functions": [TOOL["function"]]}, "functions"),
    (CHAT | {"functions": [TOOL["function"]], "function_call": "required"}, "function_call"),
    (CHAT | {"tools": [TOOL, TOOL]}, "tools"),
    (CHAT | {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    (CHAT | {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    (CHAT | {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    (CHAT | {"tool_choice": "required"}, "tool_choice"),
    (CHAT | {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    (CHAT | {"frobnicate": 1}, "frobnicate"),
    (CHAT | {"messages": []}, "messages"),
    (CHAT | {"messages": CHAT["messages"] * 257}, "messages"),
    (CHAT | {"messages": [{"role": "user", "content": "x" * (1 << 20)}] * 2}, "messages"),
    (CHAT | {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    (CHAT | {"stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT | {"seed": -1}, "seed"),
    ({"messages": CHAT["messages"]}, "model"),
])
def test_invalid_chat_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as e:
        parse("chat", body)
    assert e.value.param == param and e.value.status == 400 and param.split("[")[0] in e.value.message


def test_constraints_become_the_engines_structured_outputs():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [({"response_format": {"type": "json_object"}}, {"json_object": True}),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
              {"json": schema}),
             ({"response_format": {"type": "text"}}, None), ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
             ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
             ({"tools": [TOOL], "tool_choice": "none"}, None)]
    for extra, expected in cases:
        plan = parse("chat", CHAT | extra)
        assert plan.choices[0].sampling.get("structured_outputs") == expected and plan.tool_call is None
    assert parse("completion", {"model": "m", "prompt": "p", "guided_regex": "a"}).choices[0].sampling[
        "structured_outputs"] == {"regex": "a"}


def test_tools_go_to_the_engine_with_a_structural_tag():
    auto = parse("chat", CHAT | {"tools": [TOOL]})
    assert auto.tool_call.mode == "auto" and auto.tool_call.parallel and auto.tool_call.names == ["get_weather"]
    assert auto.renamed["structured_outputs.structural_tag"] == "tools"
    tag = json.loads(auto.choices[0].sampling["structured_outputs"]["structural_tag"])
    assert tag["format"]["type"] == "sequence"
    assert auto.choices[0].messages == CHAT["messages"]  # the engine shows the tools (tool_format.py)
    assert auto.tool_call.tool_use().request_fields() == {"tools": [TOOL], "tool_choice": "auto",
                                                          "parallel_tool_calls": True}
    named = parse("chat", CHAT | {"tools": [TOOL], "tool_choice": {"type": "function",
                                                                   "function": {"name": "get_weather"}}})
    assert named.tool_call.mode == "named" and not named.tool_call.parallel
    legacy = parse("chat", CHAT | {"functions": [TOOL["function"]], "function_call": {"name": "get_weather"}})
    assert legacy.tool_call.legacy and legacy.tool_call.mode == "named"
    assert legacy.renamed["structured_outputs.structural_tag"] == "functions"
    assert parse("chat", CHAT | {"tools": [TOOL], "parallel_tool_calls": False}).tool_call.parallel is False
    assert parse("chat", CHAT | {"tools": [TOOL], "tool_choice": "none"}).tool_call is None


def test_earlier_calls_and_results_go_to_the_engine_in_openais_current_shape():
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 4}'},
               {"role": "assistant", "function_call": {"name": "get_weather", "arguments": "not json"}},
               {"role": "function", "name": "get_weather", "content": "4"}]
    messages = parse("chat", {"model": "m", "messages": history}).choices[0].messages
    assert messages[:3] == history[:3]
    assert messages[3] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]}
    assert messages[4] == {"role": "tool", "name": "get_weather", "content": "4"}


def test_invalid_completions_name_the_field():
    for body, param in (({"model": "m", "prompt": ""}, "prompt"), ({"model": "m", "prompt": [1, 2]}, "prompt"),
                        ({"model": "m", "prompt": "a", "echo": True, "logprobs": 1}, "echo"),
                        ({"model": "m", "prompt": "a", "suffix": "b"}, "suffix"),
                        ({"model": "m", "prompt": ["a"] * 65}, "prompt"),
                        ({"model": "m", "prompt": ["a"] * 20_000, "n": 16}, "n"),
                        ({"model": "m", "prompt": "é" * (1 << 19) + "a"}, "prompt")):
        with pytest.raises(InvalidRequestError) as e:
            parse("completion", body)
        assert e.value.param == param


def test_bodies_that_are_not_text_or_nest_too_deeply_are_400s():
    for raw, param in ((b'{"messages": [{"content": "a\\ud800"}]}', "messages[0].content"),
                       (b'{"\\udc00": 1}', "\\udc00"), (b"[" * 100_000 + b"]" * 100_000, None)):
        with pytest.raises(InvalidRequestError) as e:
            decode_body(raw)
        assert e.value.param == param and e.value.status == 400
    assert decode_body('{"a": ["é", {"b": "日本"}]}'.encode()) == {"a": ["é", {"b": "日本"}]}
