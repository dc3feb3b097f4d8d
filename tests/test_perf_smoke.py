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
                                    "bench_routing", "bench_kv_cache"])
def test_benchmark_runs_quick(script):
    done = subprocess.run([sys.executable, "-m", f"perf.{script}", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(mark in done.stdout for mark in ("| pagedllm", "| offline engine", "| batch 1", "| unconstrained",
                                                "| base model", "| tenants"))


def test_lookup_bound_counts_the_steps_of_the_best_possible_lookup():
    from perf.bench_speculative import lookup_bound_steps
    # the whole output is a copy of the prompt: 5 drafts and a sampled token per step
    assert lookup_bound_steps(list(range(20)), list(range(12)), num_drafts=5) == 2
    # nothing to copy: one token per step
    assert lookup_bound_steps([1, 2], [7, 8, 9], num_drafts=5) == 3
    # the output repeats itself: 5 and 6 come one by one, then 5 6 is copied (with 5 sampled), then 6
    assert lookup_bound_steps([0], [5, 6, 5, 6, 5, 6], num_drafts=5) == 4
