"""The product, end to end: a real tritonserver on the generated repository, real tritonclient calls."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from tests.integration.conftest import grpc_inputs, metric, num_tokens, stream, texts, wait_for

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "max_tokens": 40}
CHAT = json.dumps([{"role": "user", "content": "What is the capital of France?"}])


def test_chat_answer_streams_through_ensemble(server):
    responses, error = stream(server.grpc_url, "ensemble", {"messages": CHAT, "sampling_parameters": GREEDY,
                                                            "return_finish_reason": True})
    assert error is None
    assert "Paris" in texts(responses)
    assert len(responses) > 1  # streamed, not one blob
    assert responses[-1]["finish_reason"][0] == b"stop"


@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_streamed_text_equals_unstreamed_text_byte_for_byte(server, model):
    prompt = "Write the word 'hello' in Chinese, Japanese and Korean, then add three emoji:"
    fields = {"text_input": prompt, "sampling_parameters": {"temperature": 0, "max_tokens": 48},
              "exclude_input_in_output": True, "return_num_output_tokens": True, "return_logprobs": True}
    streamed, error = stream(server.grpc_url, model, fields)
    assert error is None
    body = {**fields, "sampling_parameters": json.dumps(fields["sampling_parameters"])}
    whole = requests.post(f"http://{server.http_url}/v2/models/{model}/generate", json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    assert texts(streamed).encode() == whole.json()["text_output"].encode()
    assert "\ufffd" not in texts(streamed)
    # tokens whose text is held back (partial characters) still count, and keep their logprobs
    logprobs = [step for r in streamed if "logprobs" in r for step in json.loads(r["logprobs"][0])]
    assert num_tokens(streamed) == len(logprobs) == whole.json()["num_output_tokens"]
    assert logprobs == json.loads(whole.json()["logprobs"])


def test_with_speculation_streamed_equals_unstreamed_and_drafts_are_counted(server):
    """llm_spec's model has a 16-token vocabulary (the tokenizer's special tokens, shown as text here), so
    its output repeats and the drafts hit."""
    fields = {"input_ids": np.array([3, 4, 5, 3, 4, 5, 3, 4], dtype=np.int32), "return_num_output_tokens": True,
              "exclude_input_in_output": True,
              "sampling_parameters": {"temperature": 0, "max_tokens": 40, "ignore_eos": True,
                                      "skip_special_tokens": False}}
    streamed, error = stream(server.grpc_url, "llm_spec", {**fields, "stream": True})
    assert error is None and len(streamed) > 1
    whole, error = stream(server.grpc_url, "llm_spec", {**fields, "stream": False})
    assert error is None and len(whole) == 1
    assert texts(streamed).encode() == texts(whole).encode() and texts(whole)
    assert num_tokens(streamed) == num_tokens(whole) == 40
    time.sleep(0.2)  # metrics are flushed every 50 ms
    drafted = metric(server, "pagedllm_spec_decode_num_draft_tokens_total", model="llm_spec")
    accepted = metric(server, "pagedllm_spec_decode_num_accepted_tokens_total", model="llm_spec")
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)


def test_same_request_over_every_path(server):
    fields = {"text_input": "The capital of France is", "max_tokens": np.array([6], dtype=np.int32),
              "temperature": np.array([0.0], dtype=np.float32), "exclude_input_in_output": True}
    streamed, error = stream(server.grpc_url, "ensemble", fields)
    assert error is None
    unary = grpcclient.InferenceServerClient(server.grpc_url).infer("generate", grpc_inputs(fields))
    body = {"text_input": "The capital of France is", "max_tokens": 6, "temperature": 0.0,
            "exclude_input_in_output": True}
    http = requests.post(f"http://{server.http_url}/v2/models/ensemble/generate", json=body, timeout=60).json()
    sse = requests.post(f"http://{server.http_url}/v2/models/ensemble/generate_stream", json={**body, "stream": True},
                        timeout=60, stream=True)
    sse_text = "".join(json.loads(line[5:])["text_output"] for line in sse.iter_lines(decode_unicode=True)
                       if line.startswith("data:"))
    answers = {texts(streamed), unary.as_numpy("text_output")[0].decode(), http["text_output"], sse_text}
    assert len(answers) == 1 and "Paris" in answers.pop()
    for model in ("ensemble", "llm"):  # a non-streamed answer starts with the prompt unless it is excluded
        whole = requests.post(f"http://{server.http_url}/v2/models/{model}/generate",
                              json={**body, "exclude_input_in_output": False}, timeout=60).json()
        assert whole["text_output"] == body["text_input"] + http["text_output"]


def test_bad_requests_name_the_field_and_server_keeps_serving(server):
    cases = [({"text_input": "hi", "max_tokens": 0}, "max_tokens"),
             ({"text_input": "hi", "sampling_parameters": "{not json"}, "sampling_parameters"),
             ({"text_input": "hi", "sampling_parameters": json.dumps({"top_p": 2})}, "top_p"),
             ({"text_input": "hi", "sampling_parameters": json.dumps({"bogus": 1})}, "bogus"),
             ({"messages": "[{\"role\": \"wizard\", \"content\": \"x\"}]"}, "role"),
             ({"text_input": ""}, "text_input")]
    for body, field in cases:
        for model in ("ensemble", "llm"):
            r = requests.post(f"http://{server.http_url}/v2/models/{model}/generate", json=body, timeout=30)
            assert r.status_code == 400, (model, body, r.text)
            assert field in r.json()["error"], (model, body, r.text)
    r = requests.post(f"http://{server.http_url}/v2/models/ensemble/generate",
                      json={"text_input": "The capital of France is", "max_tokens": 4}, timeout=30)
    assert r.status_code == 200 and server.is_ready()


def test_cancelled_stream_frees_its_blocks(server):
    fields = {"text_input": "Count from one to one thousand:",
              "sampling_parameters": {"temperature": 0, "max_tokens": 1500, "ignore_eos": True}}
    responses, error = stream(server.grpc_url, "llm", fields, stop_after=5)  # then the client cancels
    assert error is None and len(responses) == 5
    assert wait_for(lambda: metric(server, "pagedllm_num_requests_running") == 0, timeout=10)
    # Every block back in the pool (cached blocks count as free: they are evictable).
    assert wait_for(lambda: metric(server, "pagedllm_kv_cache_usage_ratio") == 0, timeout=10)
    assert metric(server, "pagedllm_request_success_total") >= 1


def test_metrics_present_and_moving(server):
    names = ["pagedllm_time_to_first_token_seconds_count", "pagedllm_inter_token_latency_seconds_count",
             "pagedllm_e2e_request_latency_seconds_count", "pagedllm_request_queue_time_seconds_count",
             "pagedllm_prompt_tokens_total", "pagedllm_generation_tokens_total",
             "pagedllm_prefix_cache_queries_total", "pagedllm_prefix_cache_hits_total",
             "pagedllm_num_requests_running", "pagedllm_num_requests_waiting", "pagedllm_kv_cache_usage_ratio"]
    before = {n: metric(server, n) for n in names}
    assert not any(np.isnan(v) for v in before.values()), before
    assert metric(server, "pagedllm_kv_cache_free_blocks") > 0
    for _ in range(2):  # the second one hits the prefix cache
        _, error = stream(server.grpc_url, "ensemble", {"messages": CHAT, "sampling_parameters": GREEDY})
        assert error is None
    for n in names[:8]:
        assert wait_for(lambda n=n: metric(server, n) > before[n], timeout=5), n


def test_two_models_at_once(server):
    big, e1 = stream(server.grpc_url, "llm", {"text_input": "Hello", "sampling_parameters": {"max_tokens": 5}})
    tiny, e2 = stream(server.grpc_url, "llm_tiny", {"text_input": "Hello", "sampling_parameters": {
        "max_tokens": 5, "ignore_eos": True}, "return_num_output_tokens": True})
    assert e1 is None and e2 is None
    assert num_tokens(tiny) == 5
    assert wait_for(lambda: metric(server, "pagedllm_generation_tokens_total", model="llm_tiny") >= 5, timeout=5)


def test_overload_is_refused_at_once_and_accepted_requests_complete(server):
    from concurrent.futures import ThreadPoolExecutor
    fields = {"text_input": "Hello", "sampling_parameters": {"max_tokens": 120, "ignore_eos": True},
              "return_finish_reason": True}
    with ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda _: stream(server.grpc_url, "llm_tiny", fields), range(40)))
    refused = [error for _, error in replies if error is not None]
    assert refused, "40 requests at once against max_num_seqs 4 + max_waiting_requests 4 must shed load"
    # In a gRPC stream Triton 2.51 delivers a model's error as a message only (no status code): clients
    # recognise overload by the code that leads it (pagedllm.errors.for_triton). A unary call gets UNAVAILABLE.
    assert all(e.startswith("[overloaded] ") and "retry later" in e for e in refused), refused[0]
    served = [responses for responses, error in replies if error is None]
    assert len(served) >= 8 and all(r[-1]["finish_reason"][0] == b"length" for r in served)
    assert server.is_ready()


def test_the_log_says_which_cpu_tier_each_engine_runs(server):
    """The served engine says at start which CPU tier and path it took (cpu_isa.py), as the offline one does."""
    from pagedllm.engine.kernels import cpu_isa
    tier = cpu_isa.plan_for().isa
    ready = [line for line in server.log().splitlines() if "engine ready in process" in line]
    assert ready and all(f"CPU tier: {tier}" in line for line in ready), ready
