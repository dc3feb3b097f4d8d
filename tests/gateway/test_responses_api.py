"""The Responses API on the CPU, no server: input items become chat messages, the whole and streamed shapes
validate against the openai SDK's own types, stored responses continue for their key only."""
from __future__ import annotations

import pytest

from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.gateway.responses_api import ResponseStore, parse_request
from pagedllm_client import Chunk
from tests.gateway.test_tools import WEATHER, call


def _response_answer(body: dict, output: str, reason: str = "stop", store=None, key: str = "k"):
    answer = parse_request(body, store or ResponseStore(8, 60), key)
    if output:  # as the gateway folds the engine's chunks in, streamed or not
        answer.add(0, Chunk(output, True, reason, 7, 5))
    return answer


RESPONSE_TOOL = {"type": "function", "name": "get_weather", "parameters": WEATHER.parameters}


def test_responses_input_items_become_chat_messages():
    body = {"model": "m", "instructions": "Be brief.", "tools": [RESPONSE_TOOL], "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Bergen"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "4"}],
        "max_output_tokens": 9, "text": {"format": {"type": "json_object"}}, "tool_choice": "none"}
    plan = parse_request(body, ResponseStore(8, 60), "k").plan
    messages = plan.choices[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == "Be brief." and len(messages[2]["tool_calls"]) == 2
    assert plan.choices[0].sampling["max_tokens"] == 9 and plan.tool_call is None
    assert plan.choices[0].sampling["structured_outputs"] == {"json_object": True}
    named = parse_request({"model": "m", "input": "x", "tools": [RESPONSE_TOOL],
                           "tool_choice": {"type": "function", "name": "get_weather"}}, ResponseStore(8, 60), "k")
    assert named.plan.tool_call.mode == "named"
    for body, param in (({"model": "m", "input": []}, "input"), ({"model": "m", "input": "x", "n": 2}, "n"),
                        ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
                         "input[0].content[0]"),
                        ({"model": "m", "input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
                        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
                        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens")):
        with pytest.raises(InvalidRequestError) as e:
            parse_request(body, ResponseStore(8, 60), "k")
        assert e.value.param == param, e.value.message


def test_responses_whole_and_streamed_validate_against_the_sdk():
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter
    body = {"model": "m", "input": "Weather in Oslo?", "tools": [RESPONSE_TOOL]}
    output = "Checking.\n" + call("get_weather", '{"city": "Oslo"}')
    whole = Response.model_validate(_response_answer(body, output).whole())
    assert [item.type for item in whole.output] == ["message", "function_call"]
    assert whole.output_text == "Checking.\n" and whole.output[1].arguments == '{"city": "Oslo"}'
    assert whole.usage.input_tokens == 7 and whole.status == "completed"
    streamed = _response_answer(body, "")
    events = streamed.opening_chunks()
    for piece in (output[:5], output[5:30], output[30:]):
        events += streamed.add(0, Chunk(piece, False))
    events += streamed.add(0, Chunk("", True, "stop"))
    typed = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in events]
    assert [e.sequence_number for e in typed] == list(range(len(typed)))
    kinds = [e.type for e in typed]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.completed" and "response.function_call_arguments.done" in kinds
    final = typed[-1].response
    assert final.output_text == whole.output_text and final.output[1].arguments == whole.output[1].arguments
    cut = Response.model_validate(_response_answer({"model": "m", "input": "x"}, "abc", "length").whole())
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_stored_responses_continue_for_their_key_only_and_expire():
    now = [0.0]
    store = ResponseStore(2, 60, clock=lambda: now[0])
    first = _response_answer({"model": "m", "input": "Hi"}, "Hello!", store=store)
    response_id = first.whole()["id"]
    follow = parse_request({"model": "m", "input": "And?", "previous_response_id": response_id}, store, "k")
    assert [m["content"] for m in follow.plan.choices[0].messages] == ["Hi", "Hello!", "And?"]
    for key, at in (("other", 0.0), ("k", 61.0)):
        now[0] = at
        with pytest.raises(InvalidRequestError) as e:
            parse_request({"model": "m", "input": "x", "previous_response_id": response_id}, store, key)
        assert e.value.param == "previous_response_id"
    unstored = _response_answer({"model": "m", "input": "Hi", "store": False}, "x", store=store)
    assert unstored.whole()["store"] is False and unstored.id not in store._items
