"""Agents through the gateway with the real clients, a real tritonserver and the embedded model: the openai
SDK's tool calls (auto, parallel, streamed, legacy functions, the whole loop) and its Responses API,
LangChain's ChatOpenAI with bound tools, and the OpenAI Agents SDK. At temperature 0 the model's choice to
call or not is fixed by the prompt: the 135M model answers "What is the weather in Oslo?" in prose, but
calls when asked for "the <tool_call>" (and, allowed several, repeats it until max_tokens). The shapes and
the parsing are checked exactly."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests

from tests.integration.conftest import GatewayProcess

pytestmark = pytest.mark.integration
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
CALL = "Write the <tool_call> that gets the weather in Oslo."
CALL_ASK = [{"role": "user", "content": CALL}]
ONE = {"parallel_tool_calls": False}
TEXT_ASK = [{"role": "user", "content": "Say hello to me."}]


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    gw = GatewayProcess([server.grpc_url], tmp_path_factory.mktemp("agents") / "gateway.log").wait_ready()
    yield gw
    gw.stop()


def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused")


def sse_events(gateway, path: str, body: dict) -> list[dict]:
    """The raw stream, each event as sent (the SDK's own parsing would not validate them)."""
    reply = requests.post(gateway.base_url + path, json=body | {"stream": True}, stream=True, timeout=120)
    assert reply.status_code == 200, reply.text
    data = [line[6:] for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"]


def test_auto_calls_the_tool_or_answers_in_text(gateway):
    c = client(gateway)
    called = c.chat.completions.create(model="llm", messages=CALL_ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                       **ONE)
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    text = c.chat.completions.create(model="llm", messages=TEXT_ASK, tools=[WEATHER], max_tokens=30, temperature=0)
    assert text.choices[0].finish_reason in ("stop", "length") and text.choices[0].message.tool_calls is None
    assert text.choices[0].message.content


def test_streamed_calls_are_valid_chunks_that_add_up_to_the_whole_answer(gateway):
    from openai.types.chat import ChatCompletionChunk
    body = {"model": "llm", "messages": CALL_ASK, "tools": [WEATHER], "max_tokens": 60, "temperature": 0, **ONE}
    chunks = [ChatCompletionChunk.model_validate(e) for e in sse_events(gateway, "/chat/completions", body)]
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == "" and len(rest) > 1
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    whole = client(gateway).chat.completions.create(**body).choices[0].message.tool_calls[0]
    assert "".join(d.function.arguments for d in rest) == whole.function.arguments


def test_parallel_calls_and_at_most_one_without_them(gateway):
    c = client(gateway)
    many = c.chat.completions.create(model="llm", messages=CALL_ASK, tools=[WEATHER], tool_choice="required",
                                     max_tokens=80, temperature=0)
    calls = many.choices[0].message.tool_calls
    assert len(calls) >= 2 and len({call.id for call in calls}) == len(calls), many
    for call in calls[:-1]:  # the last may be cut by max_tokens
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
    one = c.chat.completions.create(model="llm", messages=CALL_ASK, tools=[WEATHER], tool_choice="required",
                                    max_tokens=80, temperature=0, **ONE)
    assert len(one.choices[0].message.tool_calls) == 1 and one.choices[0].finish_reason == "tool_calls"


def test_the_whole_loop_call_result_answer(gateway):
    c = client(gateway)
    first = c.chat.completions.create(model="llm", messages=CALL_ASK, tools=[WEATHER], max_tokens=60, temperature=0,
                                      **ONE)
    call = first.choices[0].message.tool_calls[0]
    history = CALL_ASK + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 4, "sky": "snow"}'}]
    final = c.chat.completions.create(model="llm", messages=history, tools=[WEATHER], max_tokens=40, temperature=0)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


def test_legacy_functions(gateway):
    answer = client(gateway).chat.completions.create(
        model="llm", messages=CALL_ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"},
        max_tokens=60, temperature=0).choices[0]
    assert answer.finish_reason == "function_call" and answer.message.function_call.name == "get_weather"
    json.loads(answer.message.function_call.arguments)


RESPONSE_TOOL = {"type": "function", **WEATHER["function"]}


def test_responses_plain_streamed_and_a_function_round_trip(gateway):
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter
    c = client(gateway)
    plain = c.responses.create(model="llm", input="What is the capital of France?", max_output_tokens=20,
                               temperature=0)
    assert plain.status in ("completed", "incomplete") and plain.output_text and plain.usage.output_tokens > 0
    events = sse_events(gateway, "/responses", {"model": "llm", "input": "What is the capital of France?",
                                                "max_output_tokens": 20, "temperature": 0})
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in events]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    assert parsed[0].type == "response.created" and parsed[-1].type in ("response.completed", "response.incomplete")
    streamed = "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
    assert streamed == plain.output_text == Response.model_validate(events[-1]["response"]).output_text
    called = c.responses.create(model="llm", input=CALL, tools=[RESPONSE_TOOL], max_output_tokens=60, temperature=0,
                                **ONE)
    call = next(item for item in called.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments)["city"]
    assert [item.type for item in called.output] == ["function_call"]
    answer = c.responses.create(model="llm", previous_response_id=called.id, max_output_tokens=40, temperature=0,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": '{"celsius": 4}'}])
    assert answer.output_text
    resent = c.responses.create(model="llm", max_output_tokens=40, temperature=0, input=[
        {"role": "user", "content": CALL},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 4}'}])
    assert resent.output_text == answer.output_text  # the stored conversation is what the client would send
    stream_events = sse_events(gateway, "/responses", {"model": "llm", "input": CALL, "tools": [RESPONSE_TOOL],
                                                       "max_output_tokens": 60, "temperature": 0, **ONE})
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in stream_events]
    pieces = "".join(e.delta for e in parsed if e.type == "response.function_call_arguments.delta")
    assert pieces == call.arguments and parsed[-1].type == "response.completed"


def test_responses_bad_input_names_the_field(gateway):
    c = client(gateway)
    for kwargs, param in (({"input": [{"type": "image", "url": "x"}]}, "input[0].type"),
                          ({"input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
                          ({"input": "hi", "extra_body": {"reasoning": {"effort": "high"}}}, "reasoning"),
                          ({"input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
                          ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
                           "input[0].arguments")):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="llm", **kwargs)
        assert e.value.body["param"] == param, e.value.body


def test_langchain_bound_tools_invoke_stream_and_an_agent_loop(gateway):
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    # The tool as the openai SDK tests send it: the same prompt to the same small model (a schema written from a
    # pydantic class renders other text, and whether the 135M model then calls the tool is a coin toss).
    llm = ChatOpenAI(base_url=gateway.base_url, api_key="unused", model="llm", temperature=0, max_tokens=60)
    bound = llm.bind_tools([WEATHER], parallel_tool_calls=False)
    message = bound.invoke(CALL)
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"]["city"]
    gathered = None
    for chunk in bound.stream(CALL):
        gathered = chunk if gathered is None else gathered + chunk
    assert len(gathered.tool_call_chunks) == len(message.tool_calls)
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [(c["name"], c["args"]) for c in message.tool_calls]

    def weather(city: str) -> str:  # the real function the agent runs
        return json.dumps({"city": city, "celsius": 4})

    history = [HumanMessage(CALL)]
    step = bound.invoke(history)
    history.append(step)
    for call in step.tool_calls:
        history.append(ToolMessage(weather(**call["args"]), tool_call_id=call["id"]))
    final = llm.invoke(history)
    assert final.content and not final.tool_calls


def test_agents_sdk_runs_a_function_tool_through_responses_and_chat(gateway):
    pytest.importorskip("agents")
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        seen.append(city)
        return f"{city}: 4 degrees and snow"

    aio = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused")
    for model in (OpenAIResponsesModel("llm", aio), OpenAIChatCompletionsModel("llm", aio)):
        seen.clear()
        # the tool's result is the agent's answer: the 135M model's second turn only echoes the result
        agent = Agent(name="weather", instructions="Answer questions about the weather.", tools=[get_weather],
                      model=model, tool_use_behavior="stop_on_first_tool",
                      model_settings=ModelSettings(temperature=0, max_tokens=60, parallel_tool_calls=False))
        result = Runner.run_sync(agent, CALL, max_turns=2)
        assert seen == ["Oslo"] and result.final_output == "Oslo: 4 degrees and snow", type(model).__name__
