"""The replicas: the choice of one, engine restarts, DNS discovery, which models are LLMs."""
from __future__ import annotations

import asyncio

from pagedllm.gateway import replicas
from pagedllm.gateway.replicas import ReplicaPool, is_llm_model, llm_models_in
from pagedllm_client import EngineUnavailable, Overloaded
from tests.gateway.bodies import REPOSITORY


def test_least_outstanding_with_ties_in_turn():
    pool = ReplicaPool(["a:1", "b:1", "c:1"], ["llm"])
    for r in pool.replicas:
        r.healthy, r.models = True, {"llm"}
    pool.replicas[2].outstanding = 1
    picked = [pool.pick("llm").replica.url for _ in range(4)]
    assert set(picked) == {"a:1", "b:1"} and picked[0] != picked[1]
    pool.replicas[0].healthy = False
    assert pool.pick("llm").replica.url == "b:1" and pool.pick("llm", exclude=pool.replicas[1]).replica.url == "c:1"
    assert pool.pick("other") is None


def test_a_replica_whose_engine_restarts_is_skipped_for_that_model(monkeypatch):
    pool = ReplicaPool(["a:1", "b:1"], ["llm"])
    for r in pool.replicas:
        r.healthy, r.models = True, {"llm", "llm_tiny"}
    now = [100.0]
    monkeypatch.setattr(replicas.time, "monotonic", lambda: now[0])
    a = pool.replicas[0]
    a.failed(EngineUnavailable("engine restarting: the engine process died; retry the request"), "llm")
    assert {pool.pick("llm").replica.url for _ in range(4)} == {"b:1"}
    assert {pool.pick("llm_tiny").replica.url for _ in range(4)} == {"a:1", "b:1"}
    a.failed(Overloaded("overloaded: 8 requests waiting; retry later"), "llm_tiny")
    assert a.serves("llm_tiny") and a.healthy
    now[0] += replicas.ENGINE_COOLDOWN_SECONDS
    assert {pool.pick("llm").replica.url for _ in range(4)} == {"a:1", "b:1"}


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
