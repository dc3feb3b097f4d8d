"""The benchmarks run on their quick settings, so they cannot rot (timings are not asserted)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
# bench_serving's smoke run is in tests/integration/test_perf_tools.py, on the session's server
@pytest.mark.parametrize("script", ["bench_engine", "bench_speculative", "bench_structured", "bench_lora",
                                    "bench_routing", "bench_kv_cache", "bench_contention"])
def test_benchmark_runs_quick(script):
    done = subprocess.run([sys.executable, "-m", f"perf.{script}", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(mark in done.stdout for mark in ("| pagedllm", "| offline engine", "| batch 1", "| unconstrained",
                                                "| base model", "| tenants", "| alone"))


def test_lookup_bound_counts_the_steps_of_the_best_possible_lookup():
    from perf.bench_speculative import lookup_bound_steps
    # the whole output is a copy of the prompt: 5 drafts and a sampled token per step
    assert lookup_bound_steps(list(range(20)), list(range(12)), num_drafts=5) == 2
    # nothing to copy: one token per step
    assert lookup_bound_steps([1, 2], [7, 8, 9], num_drafts=5) == 3
    # the output repeats itself: 5 and 6 come one by one, then 5 6 is copied (with 5 sampled), then 6
    assert lookup_bound_steps([0], [5, 6, 5, 6, 5, 6], num_drafts=5) == 4


def test_a_servers_processes_are_told_apart_by_role(tmp_path):
    """bench_serving's CPU split: tritonserver, its Python stubs (found by their name), the stubs' children."""
    import shutil
    import time

    from perf.cpu_time import cpu_by_role, cpu_seconds, server_processes
    stub = tmp_path / "triton_python_backend_stub"
    shutil.copy(shutil.which("sh"), stub)
    code = (f"import subprocess, time; subprocess.Popen([{str(stub)!r}, '-c', 'sleep 60 & wait']); "
            "sum(range(10**7)); time.sleep(60)")
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while not (roles := server_processes(server.pid))["engine processes"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(roles["Python stubs"]) == 1 and len(roles["engine processes"]) == 1
        assert roles["tritonserver"] == [server.pid]
        assert cpu_by_role(roles)["tritonserver"] > 0  # it counted to 10 million
    finally:
        for pid in roles["engine processes"] + roles["Python stubs"]:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        server.kill(), server.wait()
    assert cpu_seconds(server.pid) == 0.0  # gone
