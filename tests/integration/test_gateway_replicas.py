"""Two tritonservers behind one gateway: requests spread by outstanding count, a replica killed mid-run
fails no request that had not started streaming, and it is re-admitted once it is back."""
from __future__ import annotations

import asyncio
import signal
import urllib.request

import openai
import pytest

from pagedllm.launcher import TritonServer
from pagedllm.serving.repository import write_llm
from tests.integration.conftest import GatewayProcess, start_server, tiny_engine, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_model_dir):
    servers = []
    for name in ("a", "b"):
        repo = tmp_path_factory.mktemp(f"replica-{name}")
        write_llm(repo, "llm_tiny", {**tiny_engine(tiny_model_dir("llama-tied")), "max_waiting_requests": 64})
        servers.append(start_server(repo, repo.parent / f"tritonserver-{name}.log"))
    gateway = GatewayProcess([s.grpc_url for s in servers], tmp_path_factory.mktemp("gw") / "gateway.log",
                             None).wait_ready()
    yield servers, gateway
    gateway.stop()
    for s in servers:
        s.stop()


async def one(client: openai.AsyncOpenAI, max_tokens: int) -> dict:
    """A streamed completion: whether it began streaming, and how it ended."""
    began, text = False, ""
    try:
        stream = await client.completions.create(model="llm_tiny", prompt="Hello there", max_tokens=max_tokens,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            began = began or bool(chunk.choices and chunk.choices[0].text)
            text += chunk.choices[0].text if chunk.choices else ""
        return {"began": began, "error": None, "text": text}
    except openai.APIError as e:
        return {"began": began, "error": str(e), "text": text}


async def workload(gateway: GatewayProcess, lengths: list[int], during=None) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="none", max_retries=0)
    tasks = [asyncio.create_task(one(client, n)) for n in lengths]
    if during is not None:
        await during()
    results = await asyncio.gather(*tasks)
    await client.close()
    return results


def healthy(gateway: GatewayProcess, server: TritonServer) -> float:
    with urllib.request.urlopen(f"{gateway.url}/metrics", timeout=5) as r:
        body = r.read().decode()
    line = f'pagedllm_gateway_replica_healthy{{replica="{server.grpc_url}"}}'
    return next(float(x.split()[-1]) for x in body.splitlines() if x.startswith(line))


def test_mixed_work_spreads_by_outstanding_requests(replicas):
    servers, gateway = replicas
    start = len(gateway.records())
    results = asyncio.run(workload(gateway, [120] * 4 + [6] * 16))
    assert all(r["error"] is None for r in results)
    records = gateway.records()[start:]
    per_replica = {s.grpc_url: [r for r in records if r["replica"] == s.grpc_url] for s in servers}
    long = {url: sum(r["completion_tokens"] == 120 for r in rs) for url, rs in per_replica.items()}
    assert sorted(long.values()) == [2, 2]  # the long ones do not pile up on one replica
    assert all(len(rs) >= 6 for rs in per_replica.values())


def test_a_killed_replica_fails_only_streams_already_begun_and_is_readmitted(replicas):
    servers, gateway = replicas
    victim = servers[1]

    async def kill_midway() -> None:
        await asyncio.sleep(1.0)
        victim.process.send_signal(signal.SIGKILL)

    results = asyncio.run(workload(gateway, [80] * 6 + [10] * 10, kill_midway))
    failed = [r for r in results if r["error"] is not None]
    assert all(r["began"] for r in failed), failed  # nothing failed before its first token: those were retried
    assert len(failed) < len(results)
    assert wait_for(lambda: healthy(gateway, victim) == 0, 10)
    later = asyncio.run(workload(gateway, [5] * 6))
    assert all(r["error"] is None for r in later)  # all served by the survivor

    victim.process.wait(30)
    victim.start_ready(300)
    assert wait_for(lambda: healthy(gateway, victim) == 1, 30)
    start = len(gateway.records())
    asyncio.run(workload(gateway, [5] * 6))
    assert any(r["replica"] == victim.grpc_url for r in gateway.records()[start:])
