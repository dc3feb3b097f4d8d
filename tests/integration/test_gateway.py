"""The OpenAI gateway with the real `openai` SDK, sync, async and streaming, in front of a real
tritonserver: answers, usage, n, stop, logprobs, typed errors, keys and quotas, cancellation."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from pathlib import Path

import openai
import pytest
from hypothesis import strategies as st

from pagedllm_client import Client
from tests.integration.conftest import GatewayProcess, metric, wait_for

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
KEYS = {"full": "sk-full-0001", "one-at-a-time": "sk-conc-0002", "rpm": "sk-rpm-0003", "tpm": "sk-tpm-0004",
        "tiny-only": "sk-tiny-0005", "refill": "sk-refill-0006", "scrape": "sk-scrape-0007"}
LIMITS = {"one-at-a-time": {"max_concurrent_requests": 1}, "rpm": {"requests_per_minute": 2},
          "tpm": {"tokens_per_minute": 60}, "tiny-only": {"models": ["llm_tiny"]},
          "refill": {"requests_per_minute": 30}, "scrape": {"models": [], "metrics": True}}


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gateway")
    keys = [{"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), **LIMITS.get(name, {})}
            for name, key in KEYS.items()]
    (folder / "keys.json").write_text(json.dumps({"keys": keys}))
    gw = GatewayProcess([server.grpc_url], folder / "gateway.log", folder / "keys.json",
                        "--served-model-name", "smollm2=llm").wait_ready()
    yield gw
    gw.stop()


def client(gateway, key: str = "full", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEYS[key], **kw)


def test_chat_answer_names_paris_with_usage(gateway):
    reply = client(gateway).chat.completions.create(model="llm", messages=CHAT, temperature=0, max_tokens=24)
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == "llm"
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and choice.index == 0
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_content_equals_whole_for_emoji_and_cjk(gateway, server):
    messages = [{"role": "user", "content": "Reply with three emoji and the word 東京 written in Japanese."}]
    kw = {"model": "llm", "messages": messages, "temperature": 0, "max_tokens": 40}
    whole = client(gateway).chat.completions.create(**kw)
    chunks = list(client(gateway).chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content and any(ord(ch) > 0xFFFF or ord(ch) > 0x2E80 for ch in content)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    with Client(server.grpc_url, "llm") as direct:  # the engine's own counts, asked directly
        engine = direct.generate(messages=messages, temperature=0, max_tokens=40)
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (engine.num_input_tokens,
                                                                          engine.num_output_tokens)


def test_completions_with_n_stop_echo_and_an_alias(gateway):
    c = client(gateway)
    reply = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12, n=2,
                                 temperature=0.8, seed=7)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and len(reply.choices) == 2
    assert [ch.index for ch in reply.choices] == [0, 1] and reply.usage.completion_tokens <= 24
    # seed + i per choice: reproducible (on the float32 model: bf16 sums differ with the batch's make-up)
    seeded = [c.completions.create(model="llm_tiny", prompt="Hello", max_tokens=8, n=2, temperature=1.0, seed=7)
              for _ in range(2)]
    assert [ch.text for ch in seeded[0].choices] == [ch.text for ch in seeded[1].choices]
    assert seeded[0].choices[0].text != seeded[0].choices[1].text
    stopped = c.completions.create(model="llm", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 6"])
    assert stopped.choices[0].finish_reason == "stop" and " 6" not in stopped.choices[0].text
    echoed = c.completions.create(model="llm", prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("Hello")


def test_logprobs_for_chat_and_completions(gateway):
    reply = client(gateway).chat.completions.create(model="llm", messages=CHAT, temperature=0, max_tokens=6,
                                                    logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob == max(t.logprob for t in entry.top_logprobs)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    text = client(gateway).completions.create(model="llm", prompt="Paris is", max_tokens=5, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5 and lp.text_offset[0] == 0


def test_async_sdk_and_models(gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEYS["full"])
        replies = await asyncio.gather(*[c.chat.completions.create(model="llm_tiny", messages=CHAT, max_tokens=5,
                                                                   temperature=0) for _ in range(4)])
        models = await c.models.list()
        await c.close()
        return replies, models
    replies, models = asyncio.run(run())
    assert len({r.choices[0].message.content for r in replies}) == 1
    assert {"llm", "llm_tiny", "smollm2"} <= {m.id for m in models.data}
    tiny = client(gateway, "tiny-only").models.list()
    assert {m.id for m in tiny.data} == {"llm_tiny"}


def test_typed_errors(gateway):
    c = client(gateway, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="llm", messages=CHAT, temperature=-1)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        c.chat.completions.create(model="llm", messages=CHAT, extra_body={"tools": []})
    assert unknown.value.param == "tools"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        c.chat.completions.create(model="no-such-model", messages=CHAT)
    assert missing.value.param == "model"
    with pytest.raises(openai.PermissionDeniedError):
        client(gateway, "tiny-only", max_retries=0).chat.completions.create(model="llm", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as huge:  # the engine's own message, naming the field
        c.chat.completions.create(model="llm", messages=CHAT, max_completion_tokens=10 ** 7)
    assert huge.value.param == "max_completion_tokens"


def test_quotas_refuse_with_retry_after_and_the_sdk_retry_succeeds(gateway):
    c = client(gateway, "rpm", max_retries=0)
    for _ in range(2):
        c.completions.create(model="llm_tiny", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        c.completions.create(model="llm_tiny", prompt="Hi", max_tokens=1)
    headers = limited.value.response.headers
    assert "requests_per_minute" in limited.value.message and 1 <= int(headers["retry-after"]) <= 31
    assert headers["x-ratelimit-limit-requests"] == "2" and headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as tokens:
        client(gateway, "tpm", max_retries=0).completions.create(model="llm_tiny", prompt="Hi", max_tokens=200)
    assert "tokens_per_minute" in tokens.value.message

    # one at a time: a second request while a stream runs is refused (retry after 1 s); the SDK's own
    # retry then succeeds once the first has finished
    holder = client(gateway, "one-at-a-time", max_retries=0)
    stream = holder.completions.create(model="llm_tiny", prompt="Hi", max_tokens=60, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    before = len([r for r in gateway.records() if r["key"] == "one-at-a-time"])
    retried = client(gateway, "one-at-a-time", max_retries=3)

    threading.Thread(target=lambda: [None for _ in stream]).start()
    reply = retried.completions.create(model="llm_tiny", prompt="Hi", max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop")
    attempts = [r for r in gateway.records() if r["key"] == "one-at-a-time"][before:]
    assert any(r["status"] == 429 for r in attempts) and attempts[-1]["status"] == 200


def test_the_sdk_retry_succeeds_once_the_request_bucket_refills(gateway):
    """30 requests a minute: a burst empties the bucket and is refused with Retry-After (one request's worth
    refills in 2 s); the SDK waits that long by itself and its retry is served. Counted from the gateway's
    log: a 429, then a 200."""
    burst = client(gateway, "refill", max_retries=0)
    for _ in range(60):
        try:
            burst.completions.create(model="llm_tiny", prompt="Hi", max_tokens=1)
        except openai.RateLimitError:
            break
    else:
        pytest.fail("60 requests in a burst were all admitted under a 30-per-minute limit")
    before = len(gateway.records())
    reply = client(gateway, "refill", max_retries=2).completions.create(model="llm_tiny", prompt="Hi", max_tokens=1)
    assert reply.choices[0].finish_reason == "length"
    attempts = [r for r in gateway.records()[before:] if r["key"] == "refill"]
    assert [r["status"] for r in attempts] == [429, 200]


def test_leaving_a_stream_early_frees_the_kv_blocks(gateway, server):
    c = client(gateway)
    stream = c.completions.create(model="llm_tiny", prompt="Hello", max_tokens=400, stream=True,
                                  extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    assert wait_for(lambda: metric(server, "pagedllm_kv_cache_usage_ratio", model="llm_tiny") == 0
                    and metric(server, "pagedllm_num_requests_running", model="llm_tiny") == 0, 20)
    assert wait_for(lambda: any(r.get("cancelled") for r in gateway.records()), 10)


def test_each_request_logs_one_json_line_without_the_prompt(gateway):
    secret = "a prompt that must never be logged 7f3a"
    client(gateway).completions.create(model="llm_tiny", prompt=secret, max_tokens=2)
    time.sleep(0.2)
    assert secret not in gateway.log()
    last = gateway.records()[-1]
    assert {"request_id", "key", "model", "replica", "status", "prompt_tokens", "completion_tokens",
            "time_to_first_token", "duration", "finish_reason", "cancelled"} <= set(last)
    assert last["key"] == "full" and last["status"] == 200 and last["prompt_tokens"] > 0


def _post(gateway, path: str, body, key: str | None = "full", content_type: str = "application/json"):
    import requests
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {KEYS[key]}"} if key else {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{gateway.url}{path}", data=data, headers=headers, timeout=60)


MSG = [{"role": "user", "content": "Hi"}]
# (case, path, body, status, param); body bytes are sent as they are.
CATALOGUE = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "llm", "messages": [', 400, None),
    ("a non-UTF-8 body", "/v1/chat/completions", b'{"model": "\xff\xfe"}', 400, None),
    ("a JSON array body", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("messages not a list", "/v1/chat/completions", {"model": "llm", "messages": "Hi"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": "llm", "messages": []}, 400, "messages"),
    ("an unknown role", "/v1/chat/completions", {"model": "llm", "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages[0].role"),
    ("an image part", "/v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content"),
    ("content a number", "/v1/chat/completions", {"model": "llm", "messages": [{"role": "user", "content": 5}]},
     400, "messages[0].content"),
    ("max_tokens 0", "/v1/chat/completions", {"model": "llm", "messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens huge", "/v1/chat/completions", {"model": "llm", "messages": MSG, "max_tokens": 10 ** 9}, 400,
     "max_tokens"),
    ("max_tokens a string", "/v1/chat/completions", {"model": "llm", "messages": MSG, "max_tokens": "ten"}, 400,
     "max_tokens"),
    ("temperature NaN", "/v1/chat/completions", b'{"model": "llm", "messages": [{"role": "user", "content": "Hi"}],'
     b' "temperature": NaN}', 400, "temperature"),
    ("top_p 2", "/v1/chat/completions", {"model": "llm", "messages": MSG, "top_p": 2}, 400, "top_p"),
    ("n 0", "/v1/chat/completions", {"model": "llm", "messages": MSG, "n": 0}, 400, "n"),
    ("n 17", "/v1/chat/completions", {"model": "llm", "messages": MSG, "n": 17}, 400, "n"),
    ("five stop strings", "/v1/chat/completions", {"model": "llm", "messages": MSG, "stop": list("abcde")}, 400,
     "stop"),
    ("top_logprobs 21", "/v1/chat/completions", {"model": "llm", "messages": MSG, "logprobs": True,
                                                 "top_logprobs": 21}, 400, "top_logprobs"),
    ("stream not a bool", "/v1/chat/completions", {"model": "llm", "messages": MSG, "stream": "yes"}, 400, "stream"),
    ("an unknown field", "/v1/chat/completions", {"model": "llm", "messages": MSG, "frobnicate": 1}, 400,
     "frobnicate"),
    ("tools", "/v1/chat/completions", {"model": "llm", "messages": MSG, "tools": [{"type": "function"}]}, 400,
     "tools[0].function"),
    ("logit_bias", "/v1/completions", {"model": "llm", "prompt": "Hi", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("an empty prompt", "/v1/completions", {"model": "llm", "prompt": ""}, 400, "prompt"),
    ("a prompt over the context", "/v1/completions", {"model": "llm_tiny", "prompt": "word " * 3000}, 400, "prompt"),
    ("no model", "/v1/completions", {"prompt": "Hi"}, 400, "model"),
    ("an unknown model", "/v1/completions", {"model": "gpt-17", "prompt": "Hi"}, 404, "model"),
    ("a body over the limit", "/v1/completions", {"model": "llm", "prompt": "x" * (5 << 20)}, 413, None),
    ("a lone surrogate", "/v1/chat/completions", b'{"model": "llm", "messages": [{"role": "user", "content": '
     b'"a\\ud800b"}]}', 400, "messages[0].content"),
    ("nesting 100,000 deep", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    # 100 KB that would fan out into 320,000 engine streams
    ("20,000 prompts x n 16", "/v1/completions", {"model": "llm", "prompt": ["Hi"] * 20_000, "n": 16}, 400, "n"),
    ("65 prompts", "/v1/completions", {"model": "llm", "prompt": ["Hi"] * 65}, 400, "prompt"),
    ("1,000 messages", "/v1/chat/completions", {"model": "llm", "messages": MSG * 1000}, 400, "messages"),
    ("1.5 MiB of content", "/v1/chat/completions", {"model": "llm", "messages": [
        {"role": "user", "content": "x" * (3 << 19)}]}, 400, "messages"),
]


def rss_kib(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_bad_input_catalogue(gateway, server):
    import requests
    failures = []
    before = rss_kib(gateway.process.pid)
    for case, path, body, status, param in CATALOGUE:
        r = _post(gateway, path, body)
        error = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        if r.status_code != status or error.get("param") != param or not error.get("message") \
                or set(error) != {"message", "type", "param", "code"}:
            failures.append(f"{case}: {r.status_code} {r.text[:200]}")
    for case, r in (("a missing key", _post(gateway, "/v1/completions", {"model": "llm", "prompt": "Hi"}, None)),
                    ("the wrong content type", _post(gateway, "/v1/completions", b"prompt=Hi", "full", "text/plain")),
                    ("an unknown route", requests.get(f"{gateway.url}/v1/nothing", timeout=10))):
        if r.status_code not in (400, 401, 404) or "error" not in r.json():
            failures.append(f"{case}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert rss_kib(gateway.process.pid) - before < 64 << 10  # nothing built per choice or per message
    assert requests.get(f"{gateway.url}/ready", timeout=10).status_code == 200 and server.is_ready()
    ok = client(gateway).completions.create(model="llm_tiny", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False)
                     | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_CHAT_FIELDS = ["model", "messages", "n", "stop", "temperature", "top_p", "seed", "logprobs", "top_logprobs",
                "stream", "stream_options", "response_format", "tools", "tool_choice", "user", "top_k",
                "presence_penalty", "structured_outputs", "echo", "prompt", "suffix", "best_of", "min_p"]


def test_fuzzed_openai_bodies_get_an_answer_or_an_error_in_openai_shape(gateway, server):
    """hypothesis (50 bodies) over the OpenAI request fields (each with any JSON value, beside a valid request's own):
    never a 5xx, always OpenAI's error shape, and the gateway serves afterwards."""
    from hypothesis import HealthCheck, given, settings

    seen: list[str] = []

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
           st.dictionaries(st.sampled_from(_CHAT_FIELDS), _json, max_size=4))
    def one(path, fields):
        base = {"model": "llm_tiny", "max_tokens": 2} | (
            {"messages": MSG} if path == "/v1/chat/completions" else {"prompt": "Hi"})
        r = _post(gateway, path, base | fields)
        assert r.status_code < 500, (fields, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
        seen.append(str(r.status_code))

    one()
    assert "200" in seen and any(code.startswith("4") for code in seen)
    ok = client(gateway).completions.create(model="llm_tiny", prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None and server.is_ready()


def test_load_generator_drives_any_openai_server(gateway, tmp_path, monkeypatch):
    from perf import loadgen
    monkeypatch.setenv("OPENAI_API_KEY", KEYS["full"])
    loadgen.main(["--quick", "--protocol", "openai", "--url", gateway.base_url, "--models", "llm_tiny",
                  "--out", str(tmp_path / "openai")])
    import csv
    rows = list(csv.DictReader(open(tmp_path / "openai.csv")))
    assert len(rows) == 3 and all(r["errors"] == "0" and float(r["output_tokens_per_s"]) > 0 for r in rows)


def test_metrics_count_requests_tokens_rejections_and_replicas(gateway, server):
    import requests
    client(gateway).completions.create(model="llm_tiny", prompt="Hi", max_tokens=3)
    _post(gateway, "/v1/completions", {"model": "llm_tiny", "prompt": "Hi"}, key=None)  # 401
    scrape = lambda key: requests.get(f"{gateway.url}/metrics", timeout=10,  # noqa: E731
                                      headers={"Authorization": f"Bearer {KEYS[key]}"} if key else {})
    assert scrape(None).status_code == 401  # key names, usage and replica addresses are not for everyone
    denied = scrape("full")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "metrics_not_allowed"
    body = scrape("scrape").text
    for line in ('pagedllm_gateway_requests_total{key="full",model="llm_tiny",status="200"}',
                 'pagedllm_gateway_tokens_total{key="full",kind="completion"}',
                 'pagedllm_gateway_rejections_total{reason="missing_api_key"}',
                 f'pagedllm_gateway_replica_healthy{{replica="{server.grpc_url}"}} 1.0',
                 f'pagedllm_gateway_in_flight_requests{{replica="{server.grpc_url}"}} 0.0',
                 'pagedllm_gateway_time_to_first_token_seconds_count{model="llm_tiny"}',
                 'pagedllm_gateway_e2e_request_latency_seconds_count{model="llm_tiny"}'):
        assert line in body, line


def test_a_client_leaving_a_non_streamed_request_cancels_it(gateway, server):
    import requests
    running = lambda: metric(server, "pagedllm_num_requests_running", model="llm")  # noqa: E731
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{gateway.url}/v1/completions", timeout=2, headers={"Authorization": f"Bearer {KEYS['full']}"},
                      json={"model": "llm", "prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True})
    assert wait_for(lambda: running() == 0, 10)
    assert wait_for(lambda: gateway.records()[-1]["status"] == 499 and gateway.records()[-1]["cancelled"], 5)


# ---- structured output ------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
ASK = [{"role": "user", "content": "Give an example record as JSON."},
       {"role": "user", "content": "Describe something in Paris as JSON."}]


def test_response_format_json_schema_validates_streamed_and_not(gateway):
    import jsonschema

    from tests.test_structured_output import SCHEMAS
    c = client(gateway)
    for name, schema in SCHEMAS.items():
        for temperature, ask in ((0.0, ASK[0]), (0.8, ASK[1])):
            kw = {"model": "llm", "messages": [ask], "temperature": temperature, "seed": 5, "max_tokens": 200,
                  "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                              "strict": True}}}
            whole = c.chat.completions.create(**kw)
            assert whole.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(whole.choices[0].message.content), schema)
            if temperature:
                chunks = list(c.chat.completions.create(**kw, stream=True))
                assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content


def test_json_object_regex_and_choice_from_extra_body(gateway):
    c = client(gateway)
    reply = c.chat.completions.create(
        model="llm", temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with this JSON object and nothing else: '
                                              '{"answer": 42, "unit": "none"}'}])
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    regex = c.completions.create(model="llm", prompt="Call me at", max_tokens=30, temperature=0.8, seed=1,
                                 extra_body={"structured_outputs": {"regex": r" \+[0-9]{2} [0-9]{6}"}})
    import re
    assert re.fullmatch(r" \+[0-9]{2} [0-9]{6}", regex.choices[0].text)
    choice = c.chat.completions.create(model="llm", messages=CHAT, max_tokens=10,
                                       extra_body={"guided_choice": ["Paris", "Lyon"]})
    assert choice.choices[0].message.content in ("Paris", "Lyon")


def test_tool_calls_for_a_named_function_and_for_required(gateway):
    import jsonschema
    c = client(gateway)
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    named = c.chat.completions.create(model="llm", messages=ask, tools=[WEATHER], max_tokens=80, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    noop = {"type": "function", "function": {"name": "no_answer", "parameters": {"type": "object", "properties": {}}}}
    chunks = list(c.chat.completions.create(model="llm", messages=ask, tools=[WEATHER, noop], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=80, temperature=0.8, seed=3,
                                            stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or []) if tc.id]
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "no_answer")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    follow_up = ask + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 4}'}]
    answer = c.chat.completions.create(model="llm", messages=follow_up, max_tokens=30, temperature=0)
    assert answer.choices[0].message.content


def test_bad_constraints_are_400s_naming_the_field(gateway):
    c = client(gateway)
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
              "response_format.json_schema.schema"),
             ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
             ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
             ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools")]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="llm", messages=CHAT, max_tokens=5, **kw)
        assert e.value.body["param"] == param and param.split(".")[0] in e.value.body["message"], e.value.body
    assert c.chat.completions.create(model="llm", messages=CHAT, max_tokens=3).choices[0].message.content
