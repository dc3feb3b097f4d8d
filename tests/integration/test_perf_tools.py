"""perf/'s tools on a short setting against the real server, so they cannot rot: the perf_analyzer sweep,
the load generator (fixed concurrency and Poisson arrivals), and the comparison's two baseline models."""
from __future__ import annotations

import asyncio
import csv
import subprocess
import sys
from pathlib import Path

import pytest

from perf import loadgen, sweep

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_bench_serving_runs_quick_on_the_running_server(server):
    """bench_serving's quick run, on the session's server (starting its own took a minute of the suite)."""
    done = subprocess.run([sys.executable, "-m", "perf.bench_serving", "--quick", "--server",
                           f"{server.grpc_url},{server.http_url}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| gRPC streaming, ensemble" in done.stdout and "| offline engine" in done.stdout


def test_perf_analyzer_sweep_writes_csv(server, tmp_path):
    try:
        sweep.perf_analyzer()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    out = tmp_path / "sweep.csv"
    rows = sweep.sweep(server.grpc_url, ["llm_tiny"], [1, 2], max_tokens=4, requests=2, out=out)
    assert [int(r["Concurrency"]) for r in rows] == [1, 2]
    assert all(float(r["Response Throughput"]) > 0 for r in rows)
    with open(out) as f:
        assert len(list(csv.DictReader(f))) == 2


def test_load_generator_measures_and_writes_table_and_plots(server, tmp_path):
    work = loadgen.mixed_workload(4, (4,))
    rows = loadgen.run(server.grpc_url, ["llm_tiny", "ensemble"], [1, 2], [8.0], work)
    assert len(rows) == 6 and all(r["errors"] == 0 and r["requests"] == 4 for r in rows)
    assert all(r["output_tokens_per_s"] > 0 and r["ttft_p95_ms"] > 0 and r["itl_p50_ms"] is not None for r in rows)
    paths = loadgen.write_outputs(rows, tmp_path / "lg", "smoke")
    assert [p.suffix for p in paths] == [".csv", ".md", ".png"] and all(p.stat().st_size > 0 for p in paths)
    assert "TTFT p95" in (tmp_path / "lg.md").read_text()


@pytest.mark.parametrize("model", ["hf_naive", "hf_batched"])
def test_baselines_answer_like_the_engine(server, model):
    """The baselines are transformers `generate`; pagedllm's greedy output is token-exact with it, so the
    same request gives the same text (tiny float32 model)."""
    work = [([{"role": "user", "content": "Hello there"}], 6)] * 3
    ours = asyncio.run(loadgen.at_concurrency(server.grpc_url, "llm_tiny", work[:1], 1))[0][0]
    records, _ = asyncio.run(loadgen.at_concurrency(server.grpc_url, model, work, 3))
    assert all(r.error is None and r.tokens == 6 for r in records), records
    from pagedllm_client import Client
    texts = {Client(server.grpc_url, m).generate(messages=work[0][0], max_tokens=6, temperature=0,
                                                   ignore_eos=True).text for m in ("llm_tiny", "hf_naive")}
    assert ours.tokens == 6 and len(texts) == 1
