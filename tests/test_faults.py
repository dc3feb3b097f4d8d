"""Injected faults: a test's environment names each model's, and nothing else reads them."""
from __future__ import annotations

import pytest

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.faults import FAULTS_ENV, Faults


def test_faults_come_by_model_name_from_the_environment():
    environ = {FAULTS_ENV: '{"llm_faulty": {"fail_step_seed": 666, "exit_after_ms": 5}}'}
    assert Faults.for_model("llm_faulty", environ) == Faults(fail_step_seed=666, exit_after_ms=5)
    assert Faults.for_model("llm", environ) is None and Faults.for_model("llm", {}) is None
    with pytest.raises(ValueError, match="crash_seed"):
        Faults.for_model("m", {FAULTS_ENV: '{"m": {"crash_seed": 1}}'})


def test_engine_json_cannot_inject_faults():
    with pytest.raises(TypeError):
        EngineConfig(fault_injection={"exit_after_ms": 1})  # not a setting: tests inject faults as above
