"""The operations kit against the real tools: deploy/nginx/pagedllm.conf run by Debian's nginx in front of two
tritonservers and a gateway (streams unbuffered, split across the replicas, a stopped replica routed
around), and every metric the Grafana dashboard and the alert rules name present on a real server and
gateway."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from pagedllm.launcher import free_port
from pagedllm.serving.repository import write_llm
from tests.integration.conftest import (
    GatewayProcess,
    metric,
    show_log_on_failure,
    start_server,
    stream,
    tiny_engine,
    wait_for,
)

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
LONG = {"text_input": "Once upon a time", "sampling_parameters": {"temperature": 0, "max_tokens": 160,
                                                                  "ignore_eos": True}}


def render(conf: str, upstreams: dict[str, list[str]], listens: dict[str, int]) -> str:
    """The shipped config with its `server` lines and listen ports replaced, nothing else."""
    out, current, done = [], None, set()
    for line in conf.splitlines():
        if line.startswith("upstream "):
            current = line.split()[1]
        elif line == "}":
            current = None
        if line.strip().startswith("server ") and current in upstreams:
            if current not in done:
                options = line.split(None, 2)[2]  # "max_fails=... fail_timeout=...;"
                out += [f"    server {address} {options}" for address in upstreams[current]]
                done.add(current)
            continue
        if line.strip().startswith("listen "):
            port = line.split()[1].rstrip(";")
            line = line.replace(f"listen {port}", f"listen 127.0.0.1:{listens[port]}")
        out.append(line)
    assert done == set(upstreams), f"no such upstream in the config: {sorted(set(upstreams) - done)}"
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def nginx_stack(request, server, tmp_path_factory, tiny_model_dir) -> Iterator[dict]:
    """Replica A is the session's server, replica B a tiny-model tritonserver of its own (both serve
    llm_tiny); one gateway over both; nginx in front of all three paths."""
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is missing: install Debian's nginx-light package (`make setup` does, as root)")
    folder = tmp_path_factory.mktemp("nginx")
    write_llm(folder / "repo", "llm_tiny", tiny_engine(tiny_model_dir("llama-tied")))
    replica_b = start_server(folder / "repo", folder / "tritonserver-b.log")
    gateway = GatewayProcess([server.grpc_url, replica_b.grpc_url], folder / "gateway.log").wait_ready()
    listens = {"80": free_port(), "8000": free_port(), "8001": free_port()}
    replicas = [server, replica_b]
    conf = render((DEPLOY / "nginx" / "pagedllm.conf").read_text(), {
        "pagedllm_gateways": [f"127.0.0.1:{gateway.port}"],
        "pagedllm_triton_http": [r.http_url.replace("localhost", "127.0.0.1") for r in replicas],
        "pagedllm_triton_grpc": [r.grpc_url.replace("localhost", "127.0.0.1") for r in replicas]}, listens)
    (folder / "pagedllm.conf").write_text(conf)
    (folder / "nginx.conf").write_text(
        f"user root;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\nhttp {{\n"
        f"    access_log off;\n    client_body_temp_path {folder}/body;\n    proxy_temp_path {folder}/proxy;\n"
        f"    include {folder}/pagedllm.conf;\n}}\n")
    process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
                               stderr=open(folder / "nginx.out", "wb"))
    try:
        ports = [f"127.0.0.1:{p}" for p in listens.values()]
        assert wait_for(lambda: all(_listening(p) for p in ports), timeout=20), (folder / "nginx.out").read_text()
        yield {"openai": f"http://127.0.0.1:{listens['80']}/v1", "http": f"127.0.0.1:{listens['8000']}",
               "grpc": f"127.0.0.1:{listens['8001']}", "replicas": replicas, "gateway": gateway}
    finally:
        process.terminate()
        process.wait(timeout=30)
        gateway.stop()
        replica_b.stop()
        show_log_on_failure(request, replica_b)


def _listening(address: str) -> bool:
    import socket
    host, port = address.split(":")
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) == 0


def _arrivals(chunks: Iterator, start: float) -> list[float]:
    return [time.monotonic() - start for _ in chunks]


def test_streams_through_nginx_arrive_as_they_are_generated(nginx_stack):
    """With buffering on, every chunk would arrive at the end: the first must come long before the last."""
    c = openai.OpenAI(base_url=nginx_stack["openai"], api_key="unused")
    start = time.monotonic()
    sse = _arrivals(c.completions.create(model="llm_tiny", prompt="Once upon a time", max_tokens=160,
                                         temperature=0, stream=True, extra_body={"ignore_eos": True}), start)
    body = {**LONG, "stream": True, "sampling_parameters": json.dumps(LONG["sampling_parameters"])}
    start = time.monotonic()
    with requests.post(f"http://{nginx_stack['http']}/v2/models/llm_tiny/generate_stream", json=body, stream=True,
                       timeout=120) as r:
        events = _arrivals((line for line in r.iter_lines() if line.startswith(b"data:")), start)
    for arrivals in (sse, events):
        assert len(arrivals) > 20 and arrivals[0] < 0.5 * arrivals[-1], arrivals[:3] + arrivals[-3:]


def test_concurrent_streams_split_across_both_replicas(nginx_stack):
    replicas = nginx_stack["replicas"]
    def finished(server) -> float:
        """llm_tiny's requests that ended at max_tokens, by pagedllm's count (Triton's nv_inference_request_success
        counts the gateway's cache_state polls too; earlier tests' cancelled streams end as "abort")."""
        count = metric(server, "pagedllm_request_success_total", "llm_tiny", finish_reason="length")
        return 0.0 if math.isnan(count) else count

    def idle(server) -> bool:
        return all(metric(server, f"pagedllm_num_requests_{queue}", "llm_tiny") == 0
                   for queue in ("running", "waiting"))
    assert wait_for(lambda: all(idle(r) for r in replicas), 60)  # an earlier test's streams have ended
    time.sleep(0.2)  # and their last counts are flushed (every 50 ms)
    before = [finished(r) for r in replicas]
    errors: list = []

    def one() -> None:
        errors.append(stream(nginx_stack["grpc"], "llm_tiny", LONG)[1])
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert errors == [None] * 6
    def served() -> list[float]:
        return [finished(r) - b for r, b in zip(replicas, before)]
    assert wait_for(lambda: sum(served()) == 6, 5) and min(served()) >= 2, served()


def test_nginx_passes_triton_s_inference_paths_only(nginx_stack):
    http = f"http://{nginx_stack['http']}"
    for method, path in (("post", "/v2/repository/index"), ("post", "/v2/repository/models/llm_tiny/load"),
                         ("get", "/v2/models/stats"), ("get", "/v2/models/llm_tiny/stats"),
                         ("get", "/v2/systemsharedmemory/status"), ("get", "/v2/logging"),
                         ("get", "/v2/trace/setting")):
        assert getattr(requests, method)(http + path, timeout=10).status_code == 403, path
    for path in ("/v2/health/ready", "/v2/models/llm_tiny", "/v2/models/llm_tiny/config",
                 "/v2/models/llm_tiny/ready"):
        assert requests.get(http + path, timeout=10).status_code == 200, path
    admin = grpcclient.InferenceServerClient(nginx_stack["grpc"])
    assert admin.get_model_config("llm_tiny") is not None and admin.is_server_ready()
    for call in (admin.get_model_repository_index, admin.get_system_shared_memory_status, admin.get_log_settings):
        with pytest.raises(InferenceServerException):
            call()
    admin.close()


def test_a_stopped_replica_is_routed_around_with_no_failure(nginx_stack):
    nginx_stack["replicas"][1].stop()
    c = openai.OpenAI(base_url=nginx_stack["openai"], api_key="unused")
    short = {"text_input": "Hi", "sampling_parameters": {"max_tokens": 4}}
    for _ in range(4):
        assert stream(nginx_stack["grpc"], "llm_tiny", short)[1] is None
        r = requests.post(f"http://{nginx_stack['http']}/v2/models/llm_tiny/generate",
                          json={"text_input": "Hi", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        assert c.completions.create(model="llm_tiny", prompt="Hi", max_tokens=4).choices[0].text is not None


def _exposed(url: str) -> set[str]:
    """Every metric name a /metrics page exposes, histograms with their _bucket, _sum and _count."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    names = set()
    for kind_line in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        name, kind = kind_line
        names |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
    return names | set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M))


def test_every_metric_the_dashboard_and_the_alerts_use_is_exposed(server, tmp_path):
    gateway = GatewayProcess([server.grpc_url], tmp_path / "gateway.log").wait_ready()
    try:
        openai.OpenAI(base_url=gateway.base_url, api_key="unused").completions.create(
            model="llm_tiny", prompt="Hi", max_tokens=2)
        exposed = _exposed(server.metrics_url) | _exposed(f"{gateway.url}/metrics")
    finally:
        gateway.stop()
    dashboard = json.loads((DEPLOY / "grafana" / "pagedllm.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries.append(dashboard["templating"]["list"][1]["query"]["query"])
    alerts = (DEPLOY / "prometheus" / "alerts.yaml").read_text()
    used = set(re.findall(r"\b(?:pagedllm|nv)_\w+", "\n".join(queries) + alerts))
    assert len(used) > 20 and not used - exposed, sorted(used - exposed)
