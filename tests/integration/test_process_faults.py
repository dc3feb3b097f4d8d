"""Faults below our code, with real signals on the real processes: the engine process killed or hung
with streams in flight, an engine that keeps dying, and `pagedllm serve` stopped or losing tritonserver."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from pagedllm.engine.faults import FAULTS_ENV
from pagedllm.launcher import free_port
from pagedllm.serving.repository import SERVED_ENGINE, write_llm
from tests.integration.conftest import (
    _cmdline,
    _ppid,
    answers_200,
    engine_pid,
    metric,
    num_tokens,
    running_serve,
    start_server,
    stream,
    tiny_engine,
    triton_pid,
    wait_for,
)
from tests.support.processes import alive
from tests.support.reliability import FaultTable

pytestmark = pytest.mark.integration
LONG = {"text_input": "Once upon a time", "sampling_parameters": {"max_tokens": 600, "ignore_eos": True}}


@pytest.fixture(scope="module")
def table():
    t = FaultTable()
    yield t
    t.write()


@pytest.fixture(scope="module")
def faults_server(request, tmp_path_factory, tiny_model_dir):
    repo = tmp_path_factory.mktemp("faults")
    write_llm(repo, "llm", {**SERVED_ENGINE, "kv_cache_memory": 128 << 20, "heartbeat_timeout": 2.0})
    write_llm(repo, "llm_dying", {**tiny_engine(tiny_model_dir("llama-tied")), "max_restarts": 1})
    with pytest.MonkeyPatch.context() as env:  # the server's environment: its engines read their faults there
        env.setenv(FAULTS_ENV, json.dumps({"llm_dying": {"exit_after_ms": 1500}}))
        srv = start_server(repo, repo.parent / "tritonserver-faults.log", "explicit")
    srv.ready_at = time.monotonic()
    yield srv
    srv.stop()


def http_stream(server, fields: dict) -> tuple[str, float]:
    """An HTTP generate_stream: its last event's text, and when it ended."""
    body = {"text_input": fields["text_input"], "stream": True, **fields["sampling_parameters"]}
    with requests.post(f"http://{server.http_url}/v2/models/llm/generate_stream", json=body, stream=True,
                       timeout=60) as r:
        last = ""
        for line in r.iter_lines():
            last = line.decode() if line else last
    return last, time.monotonic()


def grpc_stream(server, fields: dict) -> tuple[str, float]:
    out, error = stream(server.grpc_url, "llm", fields)
    return error or f"{num_tokens(out)} tokens", time.monotonic()


def test_a_killed_engine_process_ends_its_streams_and_comes_back(faults_server, table):
    srv = faults_server
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(grpc_stream, srv, LONG), pool.submit(grpc_stream, srv, LONG),
                   pool.submit(http_stream, srv, LONG)]
        assert wait_for(lambda: metric(srv, "pagedllm_num_requests_running") == 3, 30)
        pid = engine_pid(srv, "llm")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        ended = [f.result(timeout=30) for f in futures]
    for message, at in ended:
        assert "[engine_unavailable] engine died: killed by SIGKILL" in message, message
        assert at - killed < 2.0, at - killed
    refused_at = time.monotonic()
    _, error = stream(srv.grpc_url, "llm", {"text_input": "Hi"})
    refused = time.monotonic() - refused_at
    assert error.startswith("[engine_unavailable] engine restarting") and refused < 1.0
    assert wait_for(lambda: stream(srv.grpc_url, "llm", {"text_input": "Hi"})[1] is None, 120)
    recovered = time.monotonic() - killed
    assert engine_pid(srv, "llm") not in (None, pid)
    assert metric(srv, "pagedllm_engine_restarts_total") == 1
    assert wait_for(lambda: metric(srv, "pagedllm_kv_cache_usage_ratio") == 0, 10)
    table.add("engine process SIGKILL (`llm`, SmolLM2)", "3 streams of 600 tokens (2 gRPC, 1 HTTP)",
              "each a final `engine died: killed by SIGKILL; retry` error, the last "
              f"{max(at for _, at in ended) - killed:.2f} s after the kill",
              f"ready throughout (see below); a request meanwhile refused in {refused * 1000:.0f} ms "
              "with `engine restarting`",
              f"{recovered:.1f} s (1 s backoff, then the load); KV cache of the new engine all free")


def test_a_stopped_engine_is_found_by_the_heartbeat(faults_server, table):
    srv = faults_server
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(grpc_stream, srv, LONG)
        assert wait_for(lambda: metric(srv, "pagedllm_num_requests_running") == 1, 30)
        pid = engine_pid(srv, "llm")
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        message, at = future.result(timeout=30)
    assert "engine died: hung: no step for" in message and at - stopped < 2.0 + 1.5
    assert wait_for(lambda: stream(srv.grpc_url, "llm", {"text_input": "Hi"})[1] is None, 120)
    assert metric(srv, "pagedllm_engine_restarts_total") == 2
    table.add("engine process SIGSTOP (hung; `heartbeat_timeout` 2 s)", "1 stream of 600 tokens",
              f"a final `engine died: hung: no step for ...` error {at - stopped:.2f} s after the stop",
              "ready throughout",
              f"{time.monotonic() - stopped:.1f} s (killed, then restarted after 2 s of backoff)")


def test_an_engine_that_keeps_dying_stays_down_and_the_rest_serve(faults_server, table):
    srv = faults_server

    assert wait_for(lambda: not answers_200(f"http://{srv.http_url}/v2/models/llm_dying/ready"), 60)
    down = time.monotonic() - srv.ready_at
    assert "the engine stays down" in srv.log() and "exited with code 71" in srv.log()
    assert stream(srv.grpc_url, "llm", {"text_input": "Hi"})[1] is None
    table.add("engine process exits 1.5 s after every start (`max_restarts` 1)", "none", "-",
              f"not ready (the model unloaded itself, log: `the engine stays down`) within {down:.1f} s of the "
              "server being ready",
              "stays down until reloaded; `llm` on the same server served throughout")


# ---- pagedllm serve ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_serve_drains_streams_and_exits_0(tmp_path, tiny_model_dir, sig, group, table):
    extra = ("--openai-port", str(free_port())) if group else ()
    with running_serve(tmp_path, tiny_model_dir("llama-tied"), *extra) as (serve, ports):
        url = f"localhost:{ports[1]}"
        fields = {"text_input": "Hello", "sampling_parameters": {"max_tokens": 480, "ignore_eos": True},
                  "return_num_output_tokens": True}
        metrics = SimpleNamespace(metrics_url=f"http://localhost:{ports[2]}/metrics")
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(stream, url, "llm", fields) for _ in range(3)]
            # all three in flight before the signal: one still on its way would meet a server shutting down. The
            # tiny model's streams last well under a second (at 300 tokens, once, a suite run never saw all three
            # at 0.2 s polls): the longest its 512 positions allow, polled often
            assert wait_for(lambda: metric(metrics, "pagedllm_num_requests_running") >= 3, 30, interval=0.02)
            sent = time.monotonic()
            (os.killpg if group else os.kill)(serve.pid, sig)
            results = [f.result(timeout=60) for f in futures]
        assert serve.wait(60) == 0
        took = time.monotonic() - sent
    for out, error in results:
        assert error is None and num_tokens(out) == 480
    table.add(f"`pagedllm serve` {sig.name} {'to its process group, gateway running' if group else 'to it alone'}",
              "3 gRPC streams of 480 tokens", "all 3 completed in full", "-", f"exit code 0 after {took:.1f} s")


def test_serve_exits_non_zero_at_once_when_tritonserver_dies(tmp_path, tiny_model_dir, table):
    with running_serve(tmp_path, tiny_model_dir("llama-tied")) as (serve, _):
        triton = triton_pid(serve)
        killed = time.monotonic()
        os.kill(triton, signal.SIGKILL)
        code = serve.wait(10)
        took = time.monotonic() - killed
        assert code != 0 and took < 2.0
        table.add("tritonserver SIGKILL under `pagedllm serve`", "none", "-", "-",
                  f"serve exited {code} after {took:.1f} s, saying why, for its supervisor to restart it")


def test_a_second_signal_stops_serve_at_once(tmp_path, tiny_model_dir, table):
    with running_serve(tmp_path, tiny_model_dir("llama-tied")) as (serve, ports):
        url = f"localhost:{ports[1]}"
        fields = {"text_input": "Hello", "sampling_parameters": {"max_tokens": 500, "ignore_eos": True}}
        threading.Thread(target=stream, args=(url, "llm", fields), daemon=True).start()
        time.sleep(0.3)
        os.kill(serve.pid, signal.SIGTERM)
        time.sleep(0.2)
        sent = time.monotonic()
        os.kill(serve.pid, signal.SIGTERM)
        code = serve.wait(10)
        took = time.monotonic() - sent
        assert code != 0 and took < 2.0
        assert wait_for(lambda: not processes_of(tmp_path), timeout=10), processes_of(tmp_path)
        table.add("a second SIGTERM to `pagedllm serve` while it drains", "1 stream of 500 tokens", "cut", "-",
                  f"everything killed; exit code {code} after {took:.2f} s")


def processes_of(tmp_path) -> list[str]:
    """The live processes (not zombies) whose command line names `tmp_path`: a test's tritonserver, stubs, engines."""
    found = []
    for proc in Path("/proc").iterdir():
        cmdline = " ".join(_cmdline(proc)) if proc.name.isdigit() else ""
        if str(tmp_path) in cmdline and alive(int(proc.name)):
            found.append(cmdline[:200])
    return found


def serves(url: str) -> bool:
    try:
        return stream(url, "llm", {"text_input": "Hi"})[1] is None
    except Exception:  # noqa: BLE001 (the server is not up yet)
        return False


def test_a_killed_stub_under_serve_restarts_tritonserver(tmp_path, tiny_model_dir, table):
    """Triton 2.51 cannot recover a dead Python stub: `pagedllm serve` restarts tritonserver instead, so the
    streams end (a connection error, retried by clients) rather than hang, and it serves again."""
    with running_serve(tmp_path, tiny_model_dir("llama-tied")) as (serve, ports):
        url = f"localhost:{ports[1]}"
        fields = {"text_input": "Hello", "sampling_parameters": {"max_tokens": 500, "ignore_eos": True}}
        metrics = SimpleNamespace(metrics_url=f"http://localhost:{ports[2]}/metrics")
        triton = triton_pid(serve)
        stub = next(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == triton
                    and "llm_0_0" in _cmdline(p))
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(grpc_stream, SimpleNamespace(grpc_url=url), {**fields}) for _ in range(2)]
            assert wait_for(lambda: metric(metrics, "pagedllm_num_requests_running") >= 1, 30)
            killed = time.monotonic()
            os.kill(stub, signal.SIGKILL)
            ended = [f.result(timeout=30) for f in futures]
        assert all(at - killed < 2.0 and "tokens" not in message for message, at in ended), ended
        assert wait_for(lambda: serves(url), 120)
        back = time.monotonic() - killed
        assert serve.poll() is None
    table.add("the `llm` Python stub SIGKILL, under `pagedllm serve`", "2 gRPC streams of 500 tokens",
              "each a connection error (retryable), the last "
              f"{max(at for _, at in ended) - killed:.2f} s after the kill",
              "at once: tritonserver is restarted (the whole server)", f"{back:.1f} s")


def test_a_serve_killed_with_sigkill_leaves_no_process_behind(tmp_path, tiny_model_dir, table):
    with running_serve(tmp_path, tiny_model_dir("llama-tied")) as (serve, _):
        assert processes_of(tmp_path)  # tritonserver, its stubs, the engine process
        killed = time.monotonic()
        os.kill(serve.pid, signal.SIGKILL)  # no handler runs: tritonserver and the stubs must follow by themselves
        serve.wait(10)
        assert wait_for(lambda: not processes_of(tmp_path), timeout=15), processes_of(tmp_path)
        took = time.monotonic() - killed
        table.add("`pagedllm serve` SIGKILL", "none", "-", "-",
                  f"tritonserver, its stubs and the engine process gone {took:.1f} s later")
