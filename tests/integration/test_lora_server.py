"""LoRA adapters through a real tritonserver: `llm_tiny` serves two adapters from its multi_lora.json, named by
`sampling_parameters.lora_name` as Triton's vLLM backend takes it; each answers as transformers running its PEFT
model, the base model as itself, and an unknown name is a 400 naming the field."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading

import openai
import pytest
import requests

from pagedllm.engine.tokenizer import encode_text
from tests.integration.conftest import (
    LATE_ADAPTER,
    TINY_ADAPTERS,
    GatewayProcess,
    engine_pid,
    metric,
    stream,
    texts,
    wait_for,
)
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


KEYS = {"admin": "sk-lora-admin-1", "user": "sk-lora-user-2", "scraper": "sk-lora-metrics-3"}


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """A gateway with an admin key and a user key, serving llm_tiny's adapters by name as `pagedllm serve` passes
    them."""
    folder = tmp_path_factory.mktemp("lora-gateway")
    keys = [{"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "admin": name == "admin",
             "metrics": name == "scraper"} for name, key in KEYS.items()]
    (folder / "keys.json").write_text(json.dumps({"keys": keys}))
    adapters = [arg for name in TINY_ADAPTERS for arg in ("--lora-adapter", f"{name}=llm_tiny")]
    gw = GatewayProcess([server.grpc_url], folder / "gateway.log", folder / "keys.json", *adapters).wait_ready()
    yield gw
    gw.stop()


def client(gateway, key: str = "user") -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=KEYS[key])


def test_the_gateway_serves_each_adapter_as_a_model_of_its_own(server, gateway):
    listed = {m.id: m for m in client(gateway).models.list().data}
    assert {name: getattr(listed[name], "parent", None) for name in TINY_ADAPTERS} == {n: "llm_tiny"
                                                                                      for n in TINY_ADAPTERS}
    for name in [*TINY_ADAPTERS, "llm_tiny"]:
        reply = client(gateway).completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        lora = {"lora_name": name} if name in TINY_ADAPTERS else {}
        direct, error = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": {
            "temperature": 0.0, "max_tokens": 8, **lora}})
        assert error is None and reply.model == name and reply.choices[0].text == texts(direct)
    scrape = requests.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"},
                          timeout=10)
    assert scrape.status_code == 403  # not a scrape key: the count itself is checked in the gateway's unit tests


def test_the_adapters_in_use_are_published_as_vllm_lora_requests_info(server, gateway):
    """The Model Server Protocol's LoRA metric, on the gateway beside the server: an endpoint picker's LoRA
    affinity reads which adapters run and how many slots there are."""
    stop = threading.Event()

    def traffic() -> None:  # sql requests back to back, so one is running whenever the gateway polls
        while not stop.is_set():
            stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": {
                "temperature": 0.0, "max_tokens": 200, "ignore_eos": True, "lora_name": "sql"}})

    def lora_line() -> str:
        scrape = requests.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {KEYS['scraper']}"},
                              timeout=10)
        return next((line for line in scrape.text.splitlines() if line.startswith("vllm:lora_requests_info{")), "")

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        assert wait_for(lambda: 'running_lora_adapters="sql"' in lora_line(), 30), lora_line()
        assert 'max_lora="2"' in lora_line() and 'model_name="llm_tiny"' in lora_line()
    finally:
        stop.set()
        thread.join()


def control(server, model: str, **fields) -> str | None:
    out, error = stream(server.grpc_url, model, {"lora_control": json.dumps(fields)})
    return error


def test_an_adapter_loads_and_unloads_in_the_llm_model_while_it_runs(server, tiny_model_dir, tokenizer):
    adapters = server.opts.model_repository / "llm_tiny" / "1" / "adapters"
    sampling = {**SAMPLING, "lora_name": LATE_ADAPTER}
    _, refused = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": sampling})
    assert "sampling_parameters.lora_name" in refused
    assert control(server, "llm_tiny", action="load", lora_name=LATE_ADAPTER,
                   lora_path=str(adapters / LATE_ADAPTER)) is None
    out, error = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": sampling})
    oracle = peft_greedy(tiny_model_dir("llama-tied"), adapters / LATE_ADAPTER, [encode_text(tokenizer, PROMPT)], 8)
    assert error is None and texts(out) == tokenizer.decode(oracle[0], skip_special_tokens=True)
    assert control(server, "llm_tiny", action="unload", lora_name=LATE_ADAPTER) is None
    _, refused = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": sampling})
    assert "sampling_parameters.lora_name" in refused
    outside = control(server, "llm_tiny", action="load", lora_name="x", lora_path=str(adapters.parent))
    assert "lora_control.lora_path" in outside and "inside lora_dir" in outside
    assert "runtime adapter loading is off" in control(server, "llm", action="load", lora_name="x", lora_path="/tmp")
    assert "lora_control.lora_name" in control(server, "llm_tiny", action="unload", lora_name="")


def test_the_gateway_loads_and_unloads_under_traffic_with_no_failed_request(server, gateway):
    adapters = server.opts.model_repository / "llm_tiny" / "1" / "adapters"
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    body = {"lora_name": "late-gw", "lora_path": str(adapters / LATE_ADAPTER), "model": "llm_tiny", "pinned": True}
    user = requests.post(f"{gateway.base_url}/load_lora_adapter", json=body,
                         headers={"Authorization": f"Bearer {KEYS['user']}"}, timeout=30)
    assert user.status_code == 403 and user.json()["error"]["code"] == "admin_only"
    failures, answered, stop = [], [], threading.Event()

    def traffic() -> None:  # base-model requests all along
        while not stop.is_set():
            try:
                client(gateway).completions.create(model="llm_tiny", prompt=PROMPT, max_tokens=4, temperature=0)
                answered.append(1)
            except Exception as e:  # noqa: BLE001
                failures.append(e)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(2):  # load, use, unload, and again
            loaded = requests.post(f"{gateway.base_url}/load_lora_adapter", json=body, headers=admin, timeout=60)
            assert loaded.status_code == 200 and "added successfully" in loaded.text
            assert "late-gw" in {m.id for m in client(gateway).models.list().data}
            reply = client(gateway).completions.create(model="late-gw", prompt=PROMPT, max_tokens=8, temperature=0)
            direct, _ = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": {
                "temperature": 0.0, "max_tokens": 8, "lora_name": "late-gw"}})
            assert reply.choices[0].text == texts(direct)
            gone = requests.post(f"{gateway.base_url}/unload_lora_adapter", json={"lora_name": "late-gw"},
                                 headers=admin, timeout=60)
            assert gone.status_code == 200 and "removed successfully" in gone.text
            with pytest.raises(openai.NotFoundError):
                client(gateway).completions.create(model="late-gw", prompt=PROMPT, max_tokens=2)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and len(answered) >= 2
    bad = requests.post(f"{gateway.base_url}/load_lora_adapter", headers=admin, timeout=30,
                        json={**body, "lora_path": "/etc"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"


def test_a_restarted_engine_still_serves_the_adapters_loaded_while_it_ran(server, tiny_model_dir, tokenizer):
    adapters = server.opts.model_repository / "llm_tiny" / "1" / "adapters"
    assert control(server, "llm_tiny", action="load", lora_name="kept", lora_path=str(adapters / LATE_ADAPTER)) is None
    pid = engine_pid(server, "llm_tiny")
    os.kill(pid, signal.SIGKILL)
    sampling = {**SAMPLING, "lora_name": "kept"}
    assert wait_for(lambda: stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT})[1] is None, 120)
    assert engine_pid(server, "llm_tiny") not in (None, pid)
    out, error = stream(server.grpc_url, "llm_tiny", {"text_input": PROMPT, "sampling_parameters": sampling})
    oracle = peft_greedy(tiny_model_dir("llama-tied"), adapters / LATE_ADAPTER, [encode_text(tokenizer, PROMPT)], 8)
    assert error is None and texts(out) == tokenizer.decode(oracle[0], skip_special_tokens=True)
    assert control(server, "llm_tiny", action="unload", lora_name="kept") is None
