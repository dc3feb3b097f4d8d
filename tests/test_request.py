"""Parsing a Triton request's tensors (serving/request.py): both contracts, errors naming the field, fuzzing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.errors import InvalidRequestError
from pagedllm.serving.request import GenerateRequest, parse_request


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


def _normalised(data: str, ids: list[int]) -> dict[str, np.ndarray]:
    return {"request": s(data), "input_ids": np.array(ids, np.int32)}


def test_normalised_request_round_trips():
    req = parse_request({"text_input": s("Hi"), "temperature": np.array([0.0], np.float32)})
    again = GenerateRequest.from_inputs(_normalised(req.to_json(), [1, 2]))
    assert again.params == req.params and again.options == req.options and again.input_ids == [1, 2]


@pytest.mark.parametrize("change", [
    lambda obj: obj["options"].update(prompt_text=["not", "text"]),
    lambda obj: obj["options"].update(stream=1),
    lambda obj: obj["options"].update(extra=True),
    lambda obj: obj["params"].update(temperature=-1),
    lambda obj: obj.update(more={}),
])
def test_a_client_sending_the_internal_request_is_checked_as_strictly(change):
    obj = json.loads(parse_request({"text_input": s("Hi")}).to_json())
    change(obj)
    with pytest.raises(InvalidRequestError, match="request|temperature"):
        GenerateRequest.from_inputs(_normalised(json.dumps(obj), [1]))


def test_input_ids_over_the_model_length_are_refused_before_they_are_read():
    ids = np.zeros(10_001, np.int64)
    with pytest.raises(InvalidRequestError, match="input_ids: 10001 tokens is over the model's max_model_len 10000"):
        parse_request({"input_ids": ids}, max_prompt_tokens=10_000)
    with pytest.raises(InvalidRequestError, match="prompt: 10001 tokens"):  # tokenized by preprocessing
        GenerateRequest.from_inputs(_normalised(parse_request({"input_ids": ids[:5]}).to_json(), list(ids)), 10_000)
    assert parse_request({"input_ids": ids[:10_000]}, max_prompt_tokens=10_000).input_ids == [0] * 10_000



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
                                       "request", "nope"} or "messages" in str(e), str(e)


def test_lora_name_is_read_from_sampling_parameters_and_travels_in_the_normalised_request():
    req = parse_request({"text_input": s("Hi"), "sampling_parameters": s('{"lora_name": "sql", "max_tokens": 3}')})
    assert req.lora_name == "sql" and req.params.max_tokens == 3
    again = GenerateRequest.from_inputs({"request": s(req.to_json()), "input_ids": np.array([1, 2], np.int32)})
    assert again.lora_name == "sql"
    assert parse_request({"text_input": s("Hi")}).lora_name is None
    for bad in ("", "../x", 7, "a" * 200):
        with pytest.raises(InvalidRequestError) as e:
            parse_request({"text_input": s("Hi"), "sampling_parameters": s(json.dumps({"lora_name": bad}))})
        assert e.value.field == "sampling_parameters.lora_name"


def test_lora_control_loads_from_a_path_and_unloads_by_name():
    from pagedllm.serving.request import LoRAControl, parse_lora_control
    load = {"lora_control": s(json.dumps({"action": "load", "lora_name": "sql", "lora_path": "/a/sql"}))}
    assert parse_lora_control(load) == LoRAControl("load", "sql", "/a/sql")
    assert parse_lora_control({"lora_control": s('{"action": "unload", "lora_name": "sql"}')}).path is None
    pinned = {"lora_control": s(json.dumps({"action": "load", "lora_name": "a", "lora_path": "/a", "pinned": True}))}
    assert parse_lora_control(pinned).pinned
    for bad, field in (('{"action": "drop", "lora_name": "x"}', "lora_control"), ("{", "lora_control"),
                       ('{"action": "load", "lora_name": "x"}', "lora_control.lora_path"),
                       ('{"action": "unload", "lora_name": "x", "lora_path": "/p"}', "lora_control.lora_path"),
                       ('{"action": "unload", "lora_name": ""}', "lora_control.lora_name"),
                       ('{"action": "unload", "lora_name": "x", "pinned": true}', "lora_control.pinned")):
        with pytest.raises(InvalidRequestError) as e:
            parse_lora_control({"lora_control": s(bad)})
        assert e.value.field == field
