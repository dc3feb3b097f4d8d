"""The serving logic the Triton models delegate to, tested without a server."""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pagedllm.engine.sequence import TokenLogprobs
from pagedllm.serving.metrics import ServingMetrics
from pagedllm.serving.repository import write_repository
from pagedllm.serving.request import GenerateRequest, InvalidRequestError, ResponseOptions, parse_request
from pagedllm.serving.response import RawResponse, prepends_prompt, shape_response

REPO = Path(__file__).resolve().parent.parent / "model_repository"


def s(text: str | bytes) -> np.ndarray:
    return np.array([text.encode() if isinstance(text, str) else text], dtype=np.object_)


def test_vllm_backend_request():
    req = parse_request({"text_input": s("Hi"), "stream": np.array([True]),
                         "sampling_parameters": s(json.dumps({"temperature": "0.5", "max_tokens": "7", "top_p": 0.9,
                                                             "ignore_eos": "true", "stop": ["\n"]})),
                         "return_finish_reason": np.array([True])})
    assert req.text == "Hi" and req.options.stream and req.options.return_finish_reason
    p = req.params
    assert (p.temperature, p.max_tokens, p.top_p, p.ignore_eos, p.stop) == (0.5, 7, 0.9, True, ["\n"])


def test_tensorrt_llm_typed_inputs_override_json():
    req = parse_request({"text_input": s("Hi"), "sampling_parameters": s('{"max_tokens": 3}'),
                         "max_tokens": np.array([9], np.int32), "temperature": np.array([0.0], np.float32),
                         "top_k": np.array([5], np.int32), "random_seed": np.array([42], np.uint64),
                         "stop_words": np.array([b"END", b""], dtype=np.object_)})
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stop) == (9, 0.0, 5, 42, ["END"])


@pytest.mark.parametrize("inputs, field", [
    ({}, "text_input"),
    ({"text_input": s("a"), "messages": s('[{"role": "user", "content": "x"}]')}, "text_input"),
    ({"text_input": s(b"\xff\xfe")}, "text_input"),
    ({"text_input": np.array([b"a", b"b"], dtype=np.object_)}, "text_input"),
    ({"messages": s("not json")}, "messages"),
    ({"messages": s('[{"role": "user"}]')}, "messages[0]"),
    ({"messages": s('[{"role": "robot", "content": "x"}]')}, "messages[0].role"),
    ({"text_input": s("a"), "sampling_parameters": s("[1]")}, "sampling_parameters"),
    ({"text_input": s("a"), "sampling_parameters": s('{"temperature": "hot"}')}, "sampling_parameters.temperature"),
    ({"text_input": s("a"), "sampling_parameters": s('{"n": 2}')}, "n"),
    ({"text_input": s("a"), "max_tokens": np.array([-1], np.int32)}, "max_tokens"),
    ({"text_input": s("a"), "temperature": np.array([np.nan], np.float32)}, "temperature"),
    ({"text_input": s("a"), "stream": np.array([1], np.int32)}, "stream"),
])
def test_bad_requests_name_the_field(inputs, field):
    with pytest.raises(InvalidRequestError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_request(inputs)


def test_normalised_request_round_trips():
    req = parse_request({"text_input": s("Hi"), "temperature": np.array([0.0], np.float32)})
    again = GenerateRequest.from_json(req.to_json(), [1, 2])
    assert again.params == req.params and again.options == req.options and again.input_ids == [1, 2]


def test_shape_response_prepends_prompt_only_when_not_streaming_and_not_excluded():
    raw = RawResponse(" world", "stop", 3, 1, [TokenLogprobs(5, -0.1, {5: -0.1, 7: -2.5})], lambda t: f"<{t}>").to_tensors()
    req = parse_request({"text_input": s("Hello"), "return_logprobs": np.array([True])})
    out = shape_response(raw, req.options)
    assert out["text_output"][0] == b"Hello world" and set(out) == {"text_output", "logprobs"}
    assert json.loads(out["logprobs"][0]) == [{"token_id": 5, "token": "<5>", "logprob": -0.1, "top_logprobs": [
        {"token_id": 5, "token": "<5>", "logprob": -0.1}, {"token_id": 7, "token": "<7>", "logprob": -2.5}]}]
    req.options.stream = True
    assert shape_response(raw, req.options)["text_output"][0] == b" world"


def test_echoed_options_shape_a_non_streamed_answer_as_the_llm_model_would():
    req = parse_request({"text_input": s("Hello " * 500), "return_finish_reason": np.array([True])})
    raw = RawResponse(" world", "stop", 3, 1, None).to_tensors()
    assert prepends_prompt(req.options)  # the only case in which the llm model sends the echo
    assert shape_response(raw, ResponseOptions(**json.loads(req.options.echo()))) == shape_response(raw, req.options)


class _Family:
    """The shape of pb_utils.MetricFamily, recording what the serving code reports."""
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels, buckets=None):  # noqa: N802 - Triton's name
        metric = _Metric()
        _Family.created[(self.name, tuple(sorted(labels.items())))] = metric
        return metric


class _Metric:
    def __init__(self):
        self.value, self.observed, self.sets = 0.0, [], 0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value, self.sets = v, self.sets + 1

    def observe(self, v):
        self.observed.append(v)


def test_metrics_turn_engine_counters_into_increments():
    from pagedllm.engine.llm_engine import EngineStats
    m = ServingMetrics(_Family, "llm", "1")
    m.on_stats(EngineStats(2, 1, 0.5, 10, 20, prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=0))
    m.on_stats(EngineStats(1, 0, 0.25, 15, 20, prefix_cache_queries=130, prefix_cache_hits=70, num_preemptions=1))
    m.on_tokens(1, 0.2, None)
    m.on_tokens(4, None, 0.05)
    m.on_finish("stop", 12, 1.5, 0.01)
    m.flush()
    labels = (("model", "llm"), ("version", "1"))
    get = lambda name, extra=(): _Family.created[(name, tuple(sorted(labels + extra)))]  # noqa: E731
    assert get("pagedllm_prefix_cache_hits_total").value == 70
    assert get("pagedllm_kv_cache_usage_ratio").value == 0.25
    assert get("pagedllm_time_to_first_token_seconds").observed == [0.2]
    assert get("pagedllm_request_success_total", (("finish_reason", "stop"),)).value == 1
    assert get("pagedllm_generation_tokens_total").value == 5 and get("pagedllm_prompt_tokens_total").value == 12
    # one observation per response: the same value 4 times would be 4 round trips to the Triton process
    assert get("pagedllm_inter_token_latency_seconds").observed == [0.05]
    # gauges are set only when they change: each set is a round trip too
    m.on_stats(EngineStats(1, 0, 0.5, 15, 20, prefix_cache_queries=130, prefix_cache_hits=70, num_preemptions=1))
    m.flush()
    assert get("pagedllm_kv_cache_usage_ratio").sets == 2 and get("pagedllm_num_requests_running").sets == 1


def test_committed_repository_matches_generator(tmp_path):
    write_repository(tmp_path)
    cmp = filecmp.dircmp(REPO, tmp_path, ignore=["__pycache__"])

    def differences(c):
        return c.left_only + c.right_only + c.diff_files + [d for sub in c.subdirs.values() for d in differences(sub)]
    assert not differences(cmp), "run `make repository` and commit model_repository/"


def test_coalesce_merges_each_requests_deltas_in_order():
    from pagedllm.engine.sequence import RequestDelta, coalesce
    d = lambda rid, tok, text, fin=None: RequestDelta(rid, [tok], text, fin, 3, tok)  # noqa: E731
    out = coalesce([d("a", 1, "He"), d("b", 1, "X"), d("a", 2, "llo"), d("a", 3, "!", "stop")])
    assert [(o.request_id, o.new_token_ids, o.new_text, o.finish_reason, o.num_output_tokens) for o in out] == [
        ("a", [1, 2, 3], "Hello!", "stop", 3), ("b", [1], "X", None, 1)]


_fuzz_values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                         st.text(max_size=6), st.lists(st.integers(-5, 5), max_size=3),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_fuzz_inputs = st.fixed_dictionaries({}, optional={
    "text_input": st.one_of(st.text(max_size=20).map(lambda t: np.array([t.encode()], dtype=np.object_)),
                            st.binary(max_size=8).map(lambda b: np.array([b], dtype=np.object_))),
    "messages": st.one_of(st.text(max_size=30), st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                                          _fuzz_values, max_size=3), max_size=3)
                          .map(json.dumps)).map(lambda t: np.array([t.encode()], dtype=np.object_)),
    "sampling_parameters": st.dictionaries(st.sampled_from(["max_tokens", "temperature", "top_p", "top_k", "seed",
                                                            "stop", "min_tokens", "ignore_eos", "nope"]),
                                           _fuzz_values, max_size=4)
                             .map(lambda d: np.array([json.dumps(d).encode()], dtype=np.object_)),
    "max_tokens": st.integers(-2 ** 31, 2 ** 31 - 1).map(lambda v: np.array([v], dtype=np.int32)),
    "temperature": st.floats(width=32, allow_nan=True).map(lambda v: np.array([v], dtype=np.float32)),
    "stream": st.lists(st.booleans(), min_size=0, max_size=2).map(np.array),
})


@settings(max_examples=150, deadline=None)
@given(_fuzz_inputs)
def test_fuzzed_inputs_parse_or_raise_an_error_naming_a_field(inputs):
    try:
        parse_request(inputs)
    except InvalidRequestError as e:
        field = str(e).split(":", 1)[0].split(".")[-1].split("[")[0]
        assert field in set(inputs) | {"text_input", "messages", "sampling_parameters", "max_tokens", "temperature",
                                       "top_p", "top_k", "seed", "stop", "min_tokens", "ignore_eos", "stream",
                                       "request"} or "messages" in str(e), str(e)
