"""Structured output through a real tritonserver: the vLLM-backend contract (`structured_outputs` and the older
`guided_*` keys in sampling_parameters) and the TensorRT-LLM contract (guided_decoding_guide_type and _guide),
streamed and not, with every output valid; bad constraints refused naming the field."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import requests

from tests.integration.conftest import stream, texts
from tests.test_structured_output import ORDER, PERSON, READING

pytestmark = pytest.mark.integration
CHAT = json.dumps([{"role": "user", "content": "Give me an example record as JSON."}])


def generate(server, model: str, body: dict) -> requests.Response:
    return requests.post(f"http://{server.http_url}/v2/models/{model}/generate",
                         json={"exclude_input_in_output": True, **body}, timeout=120)


@pytest.mark.parametrize("schema, temperature", [(PERSON, 0.0), (ORDER, 0.8), (READING, 0.0), (READING, 0.8)])
def test_json_schema_streamed_equals_unstreamed_and_validates(server, schema, temperature):
    sampling = {"temperature": temperature, "seed": 11, "max_tokens": 200, "structured_outputs": {"json": schema}}
    streamed, error = stream(server.grpc_url, "ensemble", {"messages": CHAT, "sampling_parameters": sampling})
    assert error is None
    whole = generate(server, "ensemble", {"messages": CHAT, "sampling_parameters": json.dumps(sampling)})
    assert whole.status_code == 200, whole.text
    assert texts(streamed) == whole.json()["text_output"]
    jsonschema.validate(json.loads(texts(streamed)), schema)


def test_older_guided_keys_regex_and_choice(server):
    cases = [({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
             ({"guided_regex": r"[A-Z]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[A-Z]{3}-[0-9]{2}", t) or 1 / 0),
             ({"guided_choice": ["north", "south"]}, lambda t: t in ("north", "south") or 1 / 0),
             ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}},
              lambda t: re.fullmatch(r"x\d\d", t) or 1 / 0)]
    for constraint, check in cases:
        sampling = {"temperature": 0.8, "max_tokens": 200, **constraint}
        body = {"messages": CHAT, "sampling_parameters": json.dumps(sampling)}
        r = generate(server, "llm", body)
        assert r.status_code == 200, r.text
        check(r.json()["text_output"])


def test_tensorrt_llm_guided_decoding_inputs(server):
    schema = json.dumps(READING)
    for kind, guide, check in [("json_schema", schema, lambda t: jsonschema.validate(json.loads(t), READING)),
                               ("regex", "(yes|no), [0-9]+", lambda t: re.fullmatch("(yes|no), [0-9]+", t) or 1 / 0),
                               ("ebnf_grammar", 'root ::= "ok"', lambda t: t == "ok" or 1 / 0)]:
        body = {"text_input": "Answer:", "max_tokens": 200, "temperature": 0.0, "guided_decoding_guide_type": kind,
                "guided_decoding_guide": guide}
        r = generate(server, "ensemble", body)
        assert r.status_code == 200, r.text
        check(r.json()["text_output"])


def test_bad_constraints_name_the_field_and_the_server_keeps_serving(server):
    cases = [({"sampling_parameters": json.dumps({"structured_outputs": {"regex": "[a-"}})},
              "structured_outputs.regex"),
             ({"sampling_parameters": json.dumps({"guided_json": {"type": "nonsense"}})}, "structured_outputs.json"),
             ({"sampling_parameters": json.dumps({"structured_outputs": {"choice": []}})}, "structured_outputs.choice"),
             ({"sampling_parameters": json.dumps({"structured_outputs": {"json": {}, "regex": "a"}})},
              "structured_outputs"),
             ({"guided_decoding_guide_type": "xml", "guided_decoding_guide": "<a/>"}, "guided_decoding_guide_type"),
             ({"guided_decoding_guide_type": "regex"}, "guided_decoding_guide")]
    for fields, field in cases:
        for model in ("ensemble", "llm"):
            r = generate(server, model, {"text_input": "hi", **fields})
            assert r.status_code == 400 and field in r.json()["error"], (model, fields, r.text)
    r = generate(server, "llm", {"text_input": "hi", "sampling_parameters": json.dumps(
        {"max_tokens": 5, "structured_outputs": {"choice": ["fine"]}})})
    assert r.status_code == 200 and r.json()["text_output"] == "fine" and server.is_ready()
