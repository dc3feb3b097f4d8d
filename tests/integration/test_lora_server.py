"""LoRA adapters through a real tritonserver: `llm_tiny` serves two adapters from its multi_lora.json, named by
`sampling_parameters.lora_name` as Triton's vLLM backend takes it; each answers as transformers running its PEFT
model, the base model as itself, and an unknown name is a 400 naming the field."""
from __future__ import annotations

import json

import openai
import pytest
import requests

from pagedllm.engine.tokenizer import encode_text
from tests.integration.conftest import TINY_ADAPTERS, GatewayProcess, metric, stream, texts, wait_for
from tests.support.lora import peft_greedy

pytestmark = pytest.mark.integration
PROMPT = "Write a haiku about the sea"
SAMPLING = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def oracle(server, tiny_model_dir, tokenizer):
    model_dir = tiny_model_dir("llama-tied")
    ids = encode_text(tokenizer, PROMPT)
    version = server.opts.model_repository / "llm_tiny" / "1" / "adapters"
    answers = {name: peft_greedy(model_dir, version / name, [ids], 8)[0] for name in TINY_ADAPTERS}
    answers[None] = peft_greedy(model_dir, None, [ids], 8)[0]
    return {name: tokenizer.decode(tokens, skip_special_tokens=True) for name, tokens in answers.items()}


@pytest.mark.parametrize("lora_name", [*TINY_ADAPTERS, None])
def test_each_adapter_and_the_base_answer_as_their_oracle(server, oracle, lora_name):
    sampling = {**SAMPLING, **({"lora_name": lora_name} if lora_name else {})}
    out, error = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": sampling})
    assert error is None
    assert texts(out) == oracle[lora_name]
    assert len(set(oracle.values())) == 3  # the adapters change the answer


def test_the_adapters_interleave_in_one_batch(server, oracle):
    from concurrent.futures import ThreadPoolExecutor
    names = [*TINY_ADAPTERS, None, "sql"]  # llm_tiny runs 4 at once (max_num_seqs) and queues 4
    idle = ("pagedllm_num_requests_running", "pagedllm_num_requests_waiting")
    assert wait_for(lambda: all(metric(server, name, model="llm_tiny") == 0 for name in idle), timeout=60)
    with ThreadPoolExecutor(len(names)) as pool:
        outs = list(pool.map(lambda n: stream(server.grpc_url, "llm_tiny", {
            "text_input": PROMPT, "sampling_parameters": {**SAMPLING, **({"lora_name": n} if n else {})}}), names))
    assert [error for _, error in outs] == [None] * len(names)
    assert [texts(out) for out, _ in outs] == [oracle[n] for n in names]


@pytest.mark.parametrize("model", ["llm_tiny", "llm", "ensemble"])  # the ensemble carries it to llm
def test_an_unknown_adapter_is_refused_naming_the_field(server, model):
    out, error = stream(server.grpc_url, model, {"text_input": PROMPT,
                                                 "sampling_parameters": json.dumps({"lora_name": "nope"})})
    assert error is not None and "sampling_parameters.lora_name" in error and "nope" in error
    out, error = stream(server.grpc_url, model, {"text_input": PROMPT, "sampling_parameters": {"max_tokens": 2}})
    assert error is None and texts(out)  # the model serves on


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """An open gateway (no keys) that serves llm_tiny's adapters by name, as `pagedllm serve` passes them."""
    folder = tmp_path_factory.mktemp("lora-gateway")
    adapters = [arg for name in TINY_ADAPTERS for arg in ("--lora-adapter", f"{name}=llm_tiny")]
    gw = GatewayProcess([server.grpc_url], folder / "gateway.log", None, *adapters).wait_ready()
    yield gw
    gw.stop()


def test_the_gateway_serves_each_adapter_as_a_model_of_its_own(server, gateway):
    client = openai.OpenAI(base_url=gateway.base_url, api_key="none")
    listed = {m.id: m for m in client.models.list().data}
    assert {name: getattr(listed[name], "parent", None) for name in TINY_ADAPTERS} == {n: "llm_tiny"
                                                                                      for n in TINY_ADAPTERS}
    for name in [*TINY_ADAPTERS, "llm_tiny"]:
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        lora = {"lora_name": name} if name in TINY_ADAPTERS else {}
        direct, error = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": {
            "temperature": 0.0, "max_tokens": 8, **lora}})
        assert error is None and reply.model == name and reply.choices[0].text == texts(direct)
    metrics = requests.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'pagedllm_gateway_adapter_requests_total{adapter="sql",status="200"} 1.0' in metrics
