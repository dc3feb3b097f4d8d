"""The benchmarks run on their quick settings, so they cannot rot (timings are not asserted)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_engine", "bench_serving", "bench_speculative"])
def test_benchmark_runs_quick(script):
    done = subprocess.run([sys.executable, "-m", f"perf.{script}", "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(mark in done.stdout for mark in ("| pagedllm", "| offline engine", "| batch 1"))
