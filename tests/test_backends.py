"""The backend registry: engine.json's names are its entries, "auto" picks the CPU kernels where they build
(every tier has a build, the portable one included), and each backend says whether its steps read only
the kernels' attention metadata. (Each backend's exactness against transformers: tests/test_engine_exact.py.)"""
from __future__ import annotations

import pytest

from pagedllm.engine import backends
from pagedllm.engine.config import BACKENDS, EngineConfig


def test_engine_json_names_are_the_registry():
    assert BACKENDS == ("auto", *backends.BACKENDS)
    assert all(backend.name == name for name, backend in backends.BACKENDS.items())


@pytest.mark.parametrize("asked, chosen", [("torch", "torch"), ("cpu", "cpu"), ("triton", "triton"),
                                           ("auto", "cpu")])
def test_resolve(asked, chosen):
    assert backends.resolve(EngineConfig(attention_backend=asked, device="cpu")).name == chosen


def test_which_backends_read_only_kernel_metadata():
    """The CPU kernels and Triton's take every step, prefill chunks included, from the kernels' metadata."""
    assert {name: b.kernel_metadata_only for name, b in backends.BACKENDS.items()} == {
        "torch": False, "cpu": True, "triton": True}


def test_only_the_cpu_kernels_run_int8():
    assert [name for name, b in backends.BACKENDS.items() if b.runs_int8] == ["cpu"]
