"""The backend registry: engine.json's names are its entries, "auto" picks the CPU kernels where they build
(every tier has a build, the portable one included), and each backend says which steps read only the
kernels' attention metadata. (Each backend's exactness against transformers: tests/test_engine_exact.py.)"""
from __future__ import annotations

import pytest

from pagedllm.engine import backends
from pagedllm.engine.attention import QueryGroup
from pagedllm.engine.config import BACKENDS, EngineConfig

DECODE = QueryGroup(0, 2, 1, [[0], [1]], [3, 5])
SPECULATIVE = QueryGroup(2, 1, 4, [[2]], [9], speculative=True)
PREFILL = QueryGroup(6, 1, 8, [[3, 4]], [8])


def test_engine_json_names_are_the_registry():
    assert BACKENDS == ("auto", *backends.BACKENDS)
    assert all(backend.name == name for name, backend in backends.BACKENDS.items())


@pytest.mark.parametrize("asked, chosen", [("torch", "torch"), ("cpu", "cpu"), ("triton", "triton"),
                                           ("auto", "cpu")])
def test_resolve(asked, chosen):
    assert backends.resolve(EngineConfig(attention_backend=asked, device="cpu")).name == chosen


@pytest.mark.parametrize("groups, torch_, cpu, triton", [
    ([DECODE], False, True, True),
    ([DECODE, SPECULATIVE], False, True, True),
    ([DECODE, PREFILL], False, False, True),  # a prefill chunk in the step: torch attention for all of it
])
def test_which_steps_read_only_kernel_metadata(groups, torch_, cpu, triton):
    answers = [backends.BACKENDS[name].kernel_metadata_only(groups) for name in ("torch", "cpu", "triton")]
    assert answers == [torch_, cpu, triton]


def test_only_the_cpu_kernels_run_int8():
    assert [name for name, b in backends.BACKENDS.items() if b.runs_int8] == ["cpu"]
