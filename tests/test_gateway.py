"""The gateway's pieces on the CPU, no server: request parsing and its errors, response shapes, keys,
quotas on a fake clock, and the choice of replica."""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedllm.engine.config import declared_max_model_len
from pagedllm.gateway import replicas
from pagedllm.gateway.answers import Answer, ChoiceOutput
from pagedllm.gateway.config import GatewayConfig, parse_lengths
from pagedllm.gateway.errors import InvalidRequestError, RateLimitError, UpstreamError, from_upstream, param_of
from pagedllm.gateway.keys import KeyFileError, KeyRing, Limits, load_keys
from pagedllm.gateway.protocol import decode_body, parse
from pagedllm.gateway.quotas import KeyQuota, TokenBucket
from pagedllm.gateway.replicas import ReplicaPool, is_llm_model, llm_models_in
from pagedllm_client import EngineUnavailable, Overloaded

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}]}

REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


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


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                         "parameters": {"type": "object", "required": ["city"],
                                                        "properties": {"city": {"type": "string"}}}}}


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


def test_tool_answers_whole_and_streamed():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    plan = parse("chat", CHAT | {"tools": [TOOL]})
    choice = Answer(plan, outputs=[ChoiceOutput("Let me look.\n" + call, "stop")]).whole()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look.\n"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    text = Answer(plan, outputs=[ChoiceOutput("Hello", "stop")]).whole()["choices"][0]
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
    old = Answer(legacy, outputs=[ChoiceOutput(call, "stop")]).whole()["choices"][0]
    assert old["finish_reason"] == "function_call" and old["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in old["message"]
    cut = Answer(plan, outputs=[ChoiceOutput(call[:60], "length")]).whole()["choices"][0]
    assert cut["finish_reason"] == "length" and cut["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


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


def test_engine_messages_map_to_the_request_field():
    assert param_of("sampling_parameters.temperature: -1 is out of range") == "temperature"
    assert param_of("max_tokens: 10000 with a prompt of 20 tokens is over max_model_len 8192") == "max_tokens"
    assert param_of("messages[0].role: 'x' is not one of system") == "messages[0].role"
    assert param_of("no field here") is None


def _answer(kind: str, body: dict, texts: list[str]) -> Answer:
    answer = Answer(parse(kind, body))
    answer.outputs = [ChoiceOutput(t, "stop", 7, 3) for t in texts]
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


def test_keys_file_and_authentication(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": hashlib.sha256(b"sk-a").hexdigest(),
                                          "models": ["llm"], "requests_per_minute": 3}]}))
    ring = KeyRing(load_keys(path))
    key = ring.authenticate("Bearer sk-a")
    assert key.name == "a" and key.limits == Limits(requests_per_minute=3)
    for header in (None, "Bearer", "Bearer sk-b", "Basic sk-a"):
        with pytest.raises(Exception) as e:
            ring.authenticate(header)
        assert e.value.status == 401
    with pytest.raises(Exception) as e:
        key.check_model("other")
    assert e.value.status == 403 and e.value.param == "model"
    assert KeyRing(None).authenticate(None).name == "open"
    with pytest.raises(Exception) as e:  # metrics are for scrape keys ("metrics": true) on a keyed gateway
        key.check_metrics()
    assert e.value.status == 403
    KeyRing(None).authenticate(None).check_metrics()
    for bad in ({"keys": [{"name": "a"}]}, {"keys": [{"name": "a", "sha256": "0" * 64, "rpm": 1}]},
                {"keys": [{"name": "a", "sha256": "0" * 64, "tokens_per_minute": 0}]}, [],
                {"keys": [{"name": "a", "sha256": "0" * 64, "metrics": "yes"}]},
                {"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64}]},
                {"keys": [{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}]}):
        path.write_text(json.dumps(bad))
        with pytest.raises(KeyFileError, match="--api-keys"):
            load_keys(path)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_per_minute():
    clock = Clock()
    bucket = TokenBucket(60, clock)
    bucket.take(60)
    assert bucket.wait(6) == pytest.approx(6.0)
    clock.now = 3.0
    assert bucket.wait(6) == pytest.approx(3.0)
    clock.now = 1000.0
    assert bucket.wait(60) == 0 and bucket.wait(61) > 0  # capped at capacity


def test_quota_refuses_names_the_limit_and_settles_tokens():
    clock = Clock()
    quota = KeyQuota(Limits(requests_per_minute=2, tokens_per_minute=100, max_concurrent_requests=2), clock)
    a = quota.admit(60)
    with pytest.raises(RateLimitError, match="tokens_per_minute") as e:
        quota.admit(60)
    assert e.value.retry_after == pytest.approx(12.0) and e.value.headers()["retry-after"] == "12"
    a.settle(10)  # 50 of the 60 reserved come back
    b = quota.admit(60)
    with pytest.raises(RateLimitError, match="requests_per_minute"):
        quota.admit(1)
    clock.now = 30.0
    with pytest.raises(RateLimitError, match="max_concurrent_requests"):
        KeyQuota(Limits(max_concurrent_requests=1), clock).admit(1).quota.admit(1)
    b.settle(200)  # a prompt longer than estimated is charged
    assert quota.tokens.level < 0
    with pytest.raises(RateLimitError) as big:
        quota.admit(101)
    assert big.value.headers()["x-should-retry"] == "false"
    assert quota.headers()["x-ratelimit-limit-tokens"] == "100"


def test_a_request_without_max_tokens_reserves_the_rest_of_the_context():
    quota = KeyQuota(Limits(tokens_per_minute=10_000), Clock())
    open_ended = quota.admit(100, up_to=8192)  # the prompt, up to the model's context
    assert open_ended.reserved == 8192
    with pytest.raises(RateLimitError, match="tokens_per_minute"):
        quota.admit(100, up_to=8192)
    open_ended.settle(150)  # what it used; the rest comes back
    small = KeyQuota(Limits(tokens_per_minute=1_000), Clock())
    assert small.admit(100, up_to=8192).reserved == 1_000  # a full bucket still admits it
    assert KeyQuota(Limits(max_concurrent_requests=1), Clock()).admit(100, up_to=8192).reserved == 100


def test_max_model_len_flags_and_the_repository_value(tmp_path):
    assert parse_lengths(["llm=4096", "b=8"]) == {"llm": 4096, "b": 8}
    for bad in (["llm"], ["llm=0"], ["llm=long"]):
        with pytest.raises(ValueError, match="--max-model-len"):
            parse_lengths(bad)
    config = GatewayConfig(["h:1"], max_model_len={"llm": 4096})
    assert config.context_length("llm") == 4096 and config.context_length("other") == config.default_max_model_len
    assert declared_max_model_len(REPOSITORY / "llm") == 8192  # SmolLM2's positions: engine.json sets none
    (tmp_path / "m" / "3").mkdir(parents=True)
    (tmp_path / "m" / "3" / "engine.json").write_text('{"model": "default", "max_model_len": 2048}')
    assert declared_max_model_len(tmp_path / "m") == 2048 and declared_max_model_len(tmp_path) is None


def test_least_outstanding_with_ties_in_turn():
    pool = ReplicaPool(["a:1", "b:1", "c:1"], ["llm"])
    for r in pool.replicas:
        r.healthy, r.models = True, {"llm"}
    pool.replicas[2].outstanding = 1
    picked = [pool.pick("llm").url for _ in range(4)]
    assert set(picked) == {"a:1", "b:1"} and picked[0] != picked[1]
    pool.replicas[0].healthy = False
    assert pool.pick("llm").url == "b:1" and pool.pick("llm", exclude=pool.replicas[1]).url == "c:1"
    assert pool.pick("other") is None


def test_a_replica_whose_engine_restarts_is_skipped_for_that_model(monkeypatch):
    pool = ReplicaPool(["a:1", "b:1"], ["llm"])
    for r in pool.replicas:
        r.healthy, r.models = True, {"llm", "llm_tiny"}
    now = [100.0]
    monkeypatch.setattr(replicas.time, "monotonic", lambda: now[0])
    a = pool.replicas[0]
    a.failed(EngineUnavailable("engine restarting: the engine process died; retry the request"), "llm")
    assert {pool.pick("llm").url for _ in range(4)} == {"b:1"}
    assert {pool.pick("llm_tiny").url for _ in range(4)} == {"a:1", "b:1"}
    a.failed(Overloaded("overloaded: 8 requests waiting; retry later"), "llm_tiny")
    assert a.serves("llm_tiny") and a.healthy
    now[0] += replicas.ENGINE_COOLDOWN_SECONDS
    assert {pool.pick("llm").url for _ in range(4)} == {"a:1", "b:1"}


def test_a_dns_name_gives_one_replica_per_address_and_follows_the_answer():
    answers = [["10.0.0.1:8001", "10.0.0.2:8001"], ["10.0.0.2:8001", "10.0.0.3:8001"], OSError("no answer")]

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("triton-headless", 8001)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def steps() -> list[list[str]]:
        pool = ReplicaPool(["fixed:8001"], ["llm"], dns_names=["triton-headless:8001"], resolver=resolver)
        seen = []
        for _ in range(3):
            await pool.discover()
            seen.append([r.url for r in pool.replicas])
        return seen
    assert asyncio.run(steps()) == [["fixed:8001", "10.0.0.1:8001", "10.0.0.2:8001"],
                                    ["fixed:8001", "10.0.0.2:8001", "10.0.0.3:8001"],
                                    ["fixed:8001", "10.0.0.2:8001", "10.0.0.3:8001"]]  # DNS down: kept


def test_resolve_gives_host_port_per_address():
    assert asyncio.run(replicas.resolve("127.0.0.1", 8001)) == ["127.0.0.1:8001"]
    assert asyncio.run(replicas.resolve("::1", 8001)) == ["[::1]:8001"]


def test_llm_models_are_recognised_by_their_config():
    llm = {"backend": "python", "model_transaction_policy": {"decoupled": True},
           "input": [{"name": "messages"}, {"name": "sampling_parameters"}]}
    assert is_llm_model(llm)
    assert not is_llm_model({**llm, "model_transaction_policy": {}})
    assert not is_llm_model({"platform": "ensemble", "input": llm["input"]})
    assert llm_models_in(REPOSITORY) == ["llm"]  # not the ensemble, nor pre- or postprocessing


def test_bodies_that_are_not_text_or_nest_too_deeply_are_400s():
    for raw, param in ((b'{"messages": [{"content": "a\\ud800"}]}', "messages[0].content"),
                       (b'{"\\udc00": 1}', "\\udc00"), (b"[" * 100_000 + b"]" * 100_000, None)):
        with pytest.raises(InvalidRequestError) as e:
            decode_body(raw)
        assert e.value.param == param and e.value.status == 400
    assert decode_body('{"a": ["é", {"b": "日本"}]}'.encode()) == {"a": ["é", {"b": "日本"}]}


def test_what_a_server_says_of_its_own_failure_goes_to_the_log_not_the_client():
    from pagedllm_client.errors import ServerError
    error = from_upstream(ServerError("internal: KeyError at /opt/pagedllm/src/engine.py:42"))
    assert isinstance(error, UpstreamError) and error.status == 500 and "/opt" not in str(error.body())
    assert "x-request-id" in error.message and error.detail.endswith("engine.py:42")


def test_a_key_without_a_concurrency_limit_gets_the_default_one(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "a", "sha256": "0" * 64}]}))
    quota = KeyQuota(load_keys(path)[0].limits)
    tickets = [quota.admit(10) for _ in range(Limits().max_concurrent_requests)]
    with pytest.raises(RateLimitError, match="max_concurrent_requests"):
        quota.admit(10)
    tickets[0].settle(10)
    assert quota.admit(10) is not None


def test_headers_sent_too_slowly_lose_the_connection():
    """The gateway's HTTP protocol, in a real uvicorn: a request whose headers trickle in is cut off at the
    deadline; a prompt one is answered, and its connection is kept for the next request."""
    import socket
    import threading
    import time

    import uvicorn

    from pagedllm.gateway.server import http_protocol

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http=http_protocol(0.5)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        address = sock.getsockname()
        with socket.create_connection(address, timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.3)
            slow.sendall(b"Host: x\r\n")  # still trickling past the deadline
            assert slow.recv(100) == b""  # closed by the server, not answered
        with socket.create_connection(address, timeout=10) as prompt:
            for _ in range(2):
                prompt.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert prompt.recv(1000).endswith(b"ok")
    finally:
        server.should_exit = True
        thread.join(10)


def test_the_gateway_and_the_client_import_no_torch():
    """A gateway container needs none of the engine: importing it (and the client) loads no torch."""
    code = ("import sys, pagedllm.gateway.server, pagedllm_client; "
            "print(sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
