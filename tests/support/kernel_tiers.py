"""The CPU kernels' tiers this machine can execute, each built once for the tests, two at a time (a build is
one single-threaded compiler process, and this machine has two cores)."""
from __future__ import annotations

import functools
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedllm.engine.kernels import cpu as cpu_kernels
from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.kernels.cpu_isa import CpuIsa

RUNNABLE: list[CpuIsa] = cpu_isa.runnable(cpu_isa.host())


def _build_in_a_process(isa: CpuIsa) -> None:
    code = f"from pagedllm.engine.kernels import cpu; cpu.available({isa.value!r})"
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)


@functools.cache
def built() -> frozenset[CpuIsa]:
    """The runnable tiers whose build succeeds: built in parallel processes, then loaded from the cache."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_build_in_a_process, RUNNABLE))
    return frozenset(isa for isa in RUNNABLE if cpu_kernels.available(isa))


def ops_for(isa: CpuIsa):
    """The tier's kernels, or a skip saying why there are none."""
    if isa not in built():
        pytest.skip(f"the CPU kernels for tier {isa} did not build here (see the log)")
    return cpu_kernels.load(isa)
