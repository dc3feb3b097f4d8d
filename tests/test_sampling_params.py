"""SamplingParams: each bad field is a FieldError that names it, as data, before anything is scheduled; vLLM's
legacy constraint keys move under structured_outputs."""
from __future__ import annotations

import math

import pytest

from pagedllm.engine.sampling_params import SamplingParams, move_legacy_structured_outputs
from pagedllm.errors import FieldError

BAD = [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"seed": -1}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"stop": [""]}, "stop"), ({"stop": ["x"] * 99}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"logprobs": 100}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"bogus": 1}, "bogus"), ({"ignore_eos": "yes"}, "ignore_eos"),
]


@pytest.mark.parametrize("fields, name", BAD)
def test_bad_sampling_parameters_name_the_field(fields, name):
    with pytest.raises(FieldError) as e:
        SamplingParams.from_dict(fields)
    assert e.value.field == name and str(e.value).startswith(f"{name}: ")




def test_unknown_keys_are_named_as_fields():
    with pytest.raises(FieldError) as e:
        SamplingParams.from_dict({"temperature": 0, "bogus": 1, "also": 2})
    assert e.value.field == "also" and "bogus" in e.value.reason and "temperature" in e.value.reason
    with pytest.raises(FieldError) as e:
        SamplingParams.from_dict({"structured_outputs": {"schema": {}}})
    assert e.value.field == "structured_outputs.schema"


def test_legacy_constraint_keys_move_under_structured_outputs():
    assert move_legacy_structured_outputs({"guided_regex": "a+", "seed": 1}) == {
        "seed": 1, "structured_outputs": {"regex": "a+"}}
    with pytest.raises(FieldError) as e:
        move_legacy_structured_outputs({"guided_regex": "a", "guided_json": {}})
    assert e.value.field == "structured_outputs"
    params = SamplingParams.from_dict({"guided_choice": ["x", "y"], "max_tokens": 3})
    assert params.structured_outputs.choice == ["x", "y"] and params.max_tokens == 3
