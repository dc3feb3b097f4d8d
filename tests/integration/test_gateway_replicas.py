"""Two tritonservers behind one gateway: requests spread by outstanding count, requests sharing a prompt's head
go to the replica that caches it (and stop going there once its engine restarts), a replica killed mid-run
fails no request that had not started streaming, and it is re-admitted once it is back."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.request

import openai
import pytest

from pagedllm.launcher import TritonServer, free_port
from pagedllm.serving.repository import write_llm
from tests.integration.conftest import (
    GatewayProcess,
    answers_200,
    descendants,
    engine_pid,
    kill_all,
    metric,
    running_serve,
    start_server,
    tiny_engine,
    wait_for,
)

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


def test_requests_go_to_the_replica_with_fewest_outstanding(replicas):
    """Three long streams held open (two on one replica, one on the other): every short request sent
    meanwhile goes to the replica with one. Then a mixed burst spreads over both, without errors."""
    servers, gateway = replicas

    async def run() -> tuple[list, list]:
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="none", max_retries=0)
        held = []
        for _ in range(3):
            stream = await client.completions.create(model="llm_tiny", prompt="Hello", max_tokens=500, stream=True,
                                                     extra_body={"ignore_eos": True})
            await anext(aiter(stream))
            held.append(stream)
        start = len(gateway.records())
        for _ in range(6):
            await client.completions.create(model="llm_tiny", prompt="Hi", max_tokens=2)
        shorts = gateway.records()[start:]
        for stream in held:
            await stream.close()
        mixed = await asyncio.gather(*[one(client, n) for n in [100] * 4 + [6] * 16])
        await client.close()
        return shorts, mixed

    start = len(gateway.records())
    shorts, mixed = asyncio.run(run())
    longs = [r["replica"] for r in gateway.records()[start:] if r["cancelled"] or r["completion_tokens"] > 100]
    lighter = min(set(longs), key=longs.count)
    assert sorted(longs.count(s.grpc_url) for s in servers) == [1, 2]
    assert [r["replica"] for r in shorts] == [lighter] * 6
    assert all(r["error"] is None for r in mixed)
    used = {r["replica"] for r in gateway.records()[-20:]}
    assert used == {s.grpc_url for s in servers}


def test_requests_sharing_a_prompts_head_go_to_the_replica_that_caches_it(replicas, tmp_path, tiny_model_dir):
    """Two tenants, each with its own long prompt head, four rounds: after each tenant's first request every
    later one goes to the replica that computed its head (the replicas' own prefix-cache hits say so). Once that
    replica's engine is killed and restarted, its cache is gone and the gateway no longer routes there for it."""
    servers, _ = replicas
    gateway = GatewayProcess([s.grpc_url for s in servers], tmp_path / "gateway.log", None,
                             "--tokenizer", f"llm_tiny={tiny_model_dir('llama-tied')}").wait_ready()
    by_url = {s.grpc_url: s for s in servers}

    def hits() -> dict[str, float]:
        return {url: metric(s, "pagedllm_prefix_cache_hits_total", "llm_tiny") for url, s in by_url.items()}

    try:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="none", max_retries=0)
        heads = {t: f"Tenant {t} house rules. " + " ".join(f"{t.lower()}{i}" for i in range(100)) for t in "AB"}
        before = hits()
        for turn in range(4):
            for tenant in "AB":
                client.completions.create(model="llm_tiny", prompt=f"{heads[tenant]} Question {turn}?", max_tokens=2)
            time.sleep(1.0)  # past a poll: later turns follow the engines' reports, not only what was sent
        records = gateway.records()[-8:]
        for tenant, own in (("A", records[0::2]), ("B", records[1::2])):
            assert len({r["replica"] for r in own}) == 1, (tenant, own)
            assert own[0]["routing"]["reason"] == "cache_miss"
            assert all(r["routing"]["reason"] == "cache_hit" and r["routing"]["cached_tokens"] >= 100 for r in own[1:])
        home = records[0]["replica"]
        cached = sum(r["routing"]["cached_tokens"] for r in records if r["replica"] == home) - \
            records[0]["routing"]["cached_tokens"]
        assert wait_for(lambda: hits()[home] - before[home] >= cached - 4 * 4, 10), (hits(), before, cached)

        server = by_url[home]
        old = engine_pid(server, "llm_tiny")
        os.kill(old, signal.SIGKILL)
        assert wait_for(lambda: engine_pid(server, "llm_tiny") not in (None, old), 60)
        assert wait_for(lambda: answers_200(f"http://{server.http_url}/v2/models/llm_tiny/ready"), 60)
        time.sleep(2.0)  # the engine's first answers, and a poll
        client.completions.create(model="llm_tiny", prompt=f"{heads['A']} Question after?", max_tokens=2)
        assert gateway.records()[-1]["routing"]["reason"] == "cache_miss"
        client.close()
    finally:
        gateway.stop()


def test_a_killed_replica_fails_only_streams_already_begun_and_is_readmitted(replicas):
    servers, gateway = replicas
    victim = servers[1]

    orphans: list[int] = []

    async def kill_midway() -> None:
        await asyncio.sleep(1.0)
        orphans.extend(descendants(victim.process.pid))
        victim.process.send_signal(signal.SIGKILL)

    results = asyncio.run(workload(gateway, [80] * 6 + [10] * 10, kill_midway))
    failed = [r for r in results if r["error"] is not None]
    assert all(r["began"] for r in failed), failed  # nothing failed before its first token: those were retried
    assert len(failed) < len(results)
    assert wait_for(lambda: healthy(gateway, victim) == 0, 10)
    later = asyncio.run(workload(gateway, [5] * 6))
    assert all(r["error"] is None for r in later)  # all served by the survivor

    victim.process.wait(30)
    kill_all(orphans)
    victim.start_ready(300)
    assert wait_for(lambda: healthy(gateway, victim) == 1, 30)
    start = len(gateway.records())
    asyncio.run(workload(gateway, [5] * 6))
    assert any(r["replica"] == victim.grpc_url for r in gateway.records()[start:])


def test_serve_with_openai_port_drains_streams_on_sigterm(tmp_path, tiny_model_dir):
    """`pagedllm serve --openai-port`: both start, the base URL is printed, SIGTERM lets a stream finish."""
    port = free_port()
    model = tiny_model_dir("llama-tied")
    with running_serve(tmp_path, model, "--openai-port", str(port)) as (serve, ports):
        assert wait_for(lambda: answers_200(f"http://127.0.0.1:{port}/ready"), 60), serve.log_path.read_text()
        assert f"http://127.0.0.1:{port}/v1" in serve.log_path.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        positions = json.loads((model / "config.json").read_text())["max_position_embeddings"]
        assert client.models.list().data[0].model_extra["max_model_len"] == positions  # serve told the gateway
        # the pod's Model Server Protocol (Gateway API Inference Extension): vLLM's names on the gateway's /metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            scraped = r.read().decode()
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                     "vllm:gpu_cache_usage_perc"):
            assert f'{name}{{model_name="llm"}} ' in scraped, name
        config = re.search(r'^vllm:cache_config_info\{block_size="4",cache_dtype="float32",[^}]*model_name="llm",'
                           r'num_gpu_blocks="(\d+)"', scraped, re.M)  # the replica's engine.json: dtype float32
        assert config, scraped
        tokens = 4 * int(config[1])
        assert f'pagedllm_gateway_kv_cache_capacity_tokens{{kv_cache_dtype="float32",model="llm"}} {tokens}.0' \
            in scraped, scraped
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/metrics", timeout=5) as r:  # Triton's, the same
            triton = re.findall(r'^pagedllm_kv_cache_capacity_tokens\{([^}]*)\} (\S+)$', r.read().decode(), re.M)
        assert [('kv_cache_dtype="float32"' in labels, float(value)) for labels, value in triton] == [(True, tokens)]
        log = serve.log_path.read_text()
        assert "--tokenizer" not in log or "routed by load alone" not in log  # serve gave the gateway its tokenizer
        stream = client.completions.create(model="llm", prompt="Hello", max_tokens=150, stream=True,
                                           stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        serve.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].usage.completion_tokens == 150 and first.choices[0].text is not None
        assert serve.wait(120) == 0
