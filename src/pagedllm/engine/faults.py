"""Faults the tests inject to show that failures stay contained; nothing sets them in production. A test
hands `Faults` to the engine it builds (`LLMEngine(config, faults)`, `EngineProcess(..., faults=...)`); the
engine of a model that a tritonserver runs takes its own from the environment the test starts the server with:
PAGEDLLM_TEST_FAULTS='{"llm_faulty": {"fail_step_seed": 666}}' (model name -> faults)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

FAULTS_ENV = "PAGEDLLM_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    fail_step_seed: int | None = None  # a step running a request with this seed raises inside the model
    kill_loop_seed: int | None = None  # the scheduler phase of such a step raises, which ends the engine loop
    exit_after_ms: int | None = None  # the engine process exits this long after it is ready

    @property
    def in_steps(self) -> bool:
        """Whether a fault acts inside the engine's steps (the engine looks for them there only then)."""
        return self.fail_step_seed is not None or self.kill_loop_seed is not None

    @classmethod
    def for_model(cls, name: str, environ: Mapping[str, str] = os.environ) -> Faults | None:
        """The faults FAULTS_ENV gives model `name`, if any (a malformed value is the test's bug: it raises)."""
        entry = json.loads(environ.get(FAULTS_ENV) or "{}").get(name)
        if entry is None:
            return None
        unknown = set(entry) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{FAULTS_ENV}: unknown faults {sorted(unknown)} for {name}")
        return cls(**entry)
