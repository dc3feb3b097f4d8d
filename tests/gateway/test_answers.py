"""OpenAI's response objects built from the engine's chunks."""
from __future__ import annotations

from pagedllm.gateway.answers import Answer
from pagedllm.gateway.protocol import parse
from pagedllm_client import Completion
from tests.gateway.bodies import CHAT, TOOL


def _answer(kind: str, body: dict, texts: list[str]) -> Answer:
    answer = Answer(parse(kind, body))
    answer.outputs = [Completion(t, "stop", 7, 3) for t in texts]
    return answer


def test_whole_answers_and_chunks_have_openai_shapes():
    chat = _answer("chat", CHAT | {"n": 2, "stream": True, "stream_options": {"include_usage": True}}, ["a", "b"])
    whole = chat.whole()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"][1] == {"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": None,
                                   "finish_reason": "stop"}
    assert whole["usage"] == {"prompt_tokens": 7, "completion_tokens": 6, "total_tokens": 13}  # prompt counted once
    first = chat.opening_chunks()[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and first["usage"] is None
    assert chat.usage_chunk()["choices"] == [] and chat.usage_chunk()["id"] == first["id"]
    text = _answer("completion", {"model": "m", "prompt": "Hi", "echo": True}, [" there"])
    assert text.whole()["choices"][0]["text"] == "Hi there" and text.opening_chunks()[0]["choices"][0]["text"] == "Hi"


def test_logprobs_shapes():
    step = {"token_id": 5, "token": " é", "logprob": -0.5, "top_logprobs": [{"token_id": 5, "token": " é",
                                                                             "logprob": -0.5}]}
    chat = _answer("chat", CHAT | {"logprobs": True, "top_logprobs": 1}, ["x"])
    content = chat.chunks(0, "x", [step], None)[0]["choices"][0]["logprobs"]["content"][0]
    assert content == {"token": " é", "logprob": -0.5, "bytes": [32, 195, 169],
                       "top_logprobs": [{"token": " é", "logprob": -0.5, "bytes": [32, 195, 169]}]}
    text = _answer("completion", {"model": "m", "prompt": "Hi", "logprobs": 1}, [" é é"])
    lp = text.chunks(0, " é", [step], None)[0]["choices"][0]["logprobs"]
    assert lp == {"tokens": [" é"], "token_logprobs": [-0.5], "top_logprobs": [{" é": -0.5}], "text_offset": [2]}


def test_tool_answers_whole_and_streamed():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    plan = parse("chat", CHAT | {"tools": [TOOL]})
    choice = Answer(plan, outputs=[Completion("Let me look.\n" + call, "stop")]).whole()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look.\n"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    text = Answer(plan, outputs=[Completion("Hello", "stop")]).whole()["choices"][0]
    assert text["finish_reason"] == "stop" and text["message"] == {"role": "assistant", "content": "Hello"}
    streamed = Answer(plan)
    chunks = [c for piece in (call[:20], call[20:50], call[50:]) for c in streamed.chunks(0, piece, [], None)]
    chunks += streamed.chunks(0, "", [], "stop")
    deltas = [c["choices"][0]["delta"] for c in chunks]
    head = deltas[0]["tool_calls"][0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:] if d]
    assert "".join(pieces) == '{"city": "Oslo"}' and len(pieces) > 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    legacy = parse("chat", CHAT | {"functions": [TOOL["function"]]})
    old = Answer(legacy, outputs=[Completion(call, "stop")]).whole()["choices"][0]
    assert old["finish_reason"] == "function_call" and old["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in old["message"]
    cut = Answer(plan, outputs=[Completion(call[:60], "length")]).whole()["choices"][0]
    assert cut["finish_reason"] == "length" and cut["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
