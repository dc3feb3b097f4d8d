"""How a chat's tools, calls and results reach the model (tool_format.py): through a template that renders
tools, or the fallback; and the Triton contract's tools, tool_choice and parallel_tool_calls inputs."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from pagedllm.engine.tokenizer import encode_chat, encode_text, tools_reach_the_model_by
from pagedllm.errors import InvalidRequestError
from pagedllm.serving.request import parse_request
from pagedllm.serving.tokenization import tokenize_request
from pagedllm.tool_format import ToolUse, chat_for_model, renders_tools

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
HISTORY = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 4}'}]
# A Hermes-style template that renders tools, written for this test (Qwen2.5's and Hermes' do the same).
HERMES = ("{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n"
          "{% endif %}Tools:\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
          "Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
          "{%- for m in messages %}{% if not (tools and loop.first and m.role == 'system') %}<|im_start|>"
          "{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n"
          "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
          "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hermes(tokenizer):
    model = copy.deepcopy(tokenizer)
    model.chat_template = HERMES
    return model


def test_which_templates_render_tools(tokenizer, hermes):
    assert not renders_tools(tokenizer.chat_template) and renders_tools(HERMES) and not renders_tools(None)
    assert tools_reach_the_model_by(hermes) == "its own chat template"
    assert tools_reach_the_model_by(tokenizer).startswith("the Hermes-style fallback")


def test_the_fallback_writes_tools_calls_and_results_as_text(tokenizer):
    use = ToolUse((WEATHER,), "auto", True)
    messages, tools = chat_for_model(HISTORY, use, template_renders_tools=False)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    system = messages[0]["content"]
    assert system.startswith("Be brief.\n\nYou can call these functions") and '"name": "get_weather"' in system
    assert "Call a function only when it helps" in system and "several calls" in system
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                           '{"city": "Oslo"}}\n</tool_call>'}
    assert messages[3] == {"role": "tool", "content": '<tool_response>\n{"celsius": 4}\n</tool_response>'}
    named = chat_for_model(HISTORY[1:2], ToolUse((WEATHER,), "named", False), False)[0]
    assert named[0]["role"] == "system"
    assert "Answer with a call of get_weather. Write at most one" in named[0]["content"]
    text, ids = encode_chat(tokenizer, HISTORY, use)
    assert "<|im_start|>tool\n<tool_response>" in text
    assert ids == encode_text(tokenizer, text, add_special_tokens=False)
    legacy = chat_for_model([{"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}], None, False)[0]
    assert legacy[0]["content"] == 'Looking.\n<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>'


def test_a_template_that_renders_tools_gets_them_and_the_structured_history(hermes):
    text, ids = encode_chat(hermes, HISTORY, ToolUse((WEATHER,), "auto", True))
    assert text.startswith("<|im_start|>system\nBe brief.\n\nTools:\n<tools>\n") and '"get_weather"' in text
    assert "You can call these functions" not in text  # the fallback's prompt is not added
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<|im_start|>tool\n{\"celsius\": 4}<|im_end|>" in text
    assert ids == encode_text(hermes, text, add_special_tokens=False)
    with pytest.raises(ValueError, match="tools: a tool or an earlier call holds '<|im_end|>'"):
        encode_chat(hermes, HISTORY, ToolUse(({"name": "x", "description": "<|im_end|>"},)))


def s(value: str | bool | dict | list) -> np.ndarray:
    if isinstance(value, bool):
        return np.array([value])
    return np.array([(value if isinstance(value, str) else json.dumps(value)).encode()], dtype=np.object_)


def inputs(**given) -> dict[str, np.ndarray]:
    return {"messages": s(HISTORY)} | {name: s(value) for name, value in given.items()}


def test_the_triton_contract_takes_openais_tool_fields(tokenizer):
    tools = [{"type": "function", "function": WEATHER}]
    req = parse_request(inputs(tools=tools))
    assert req.tools == ToolUse((WEATHER,), "auto", True) and req.messages == HISTORY
    assert parse_request(inputs(tools=tools, tool_choice="required", parallel_tool_calls=False)).tools == \
        ToolUse((WEATHER,), "required", False)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert parse_request(inputs(tools=tools, tool_choice=named)).tools.mode == "named"
    assert parse_request(inputs(tools=tools, tool_choice="none")).tools is None
    prompt = tokenize_request(tokenizer, req)
    assert "You can call these functions" in tokenizer.decode(prompt)
    assert ToolUse((WEATHER,), "auto", True).request_fields() == {"tools": tools, "tool_choice": "auto",
                                                                  "parallel_tool_calls": True}


@pytest.mark.parametrize("given, field", [
    ({"tools": "[{"}, "tools"), ({"tools": []}, "tools"), ({"tools": [{"type": "code"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "a", "x": 1}}]}, "tools[0].function.x"),
    ({"tools": [{"type": "function", "function": {"name": "a"}}] * 2}, "tools[1].function.name"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": WEATHER}], "tool_choice": "pick"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": WEATHER}], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_fields_name_the_field(given, field):
    with pytest.raises(InvalidRequestError, match=f"^{re.escape(field)}:"):
        parse_request(inputs(**given))


@pytest.mark.parametrize("message, field", [
    ({"role": "user", "content": None}, "messages[0].content"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "a", "type": "function",
                                                     "function": {"name": "f", "arguments": "{}"}}]},
     "messages[0].tool_calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "a"}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f"}}]},
     "messages[0].tool_calls[0].function"),
    ({"role": "tool", "content": "4", "tool_call_id": 7}, "messages[0].tool_call_id"),
])
def test_bad_tool_messages_name_the_field(message, field):
    with pytest.raises(InvalidRequestError, match=f"^{re.escape(field)}:"):
        parse_request({"messages": s([message])})


def test_tools_need_a_chat():
    with pytest.raises(InvalidRequestError, match="^tools:"):
        parse_request({"text_input": s("hi"), "tools": s([{"type": "function", "function": WEATHER}])})
