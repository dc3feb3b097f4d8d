"""The messages between the serving process (engine_process.py) and the engine process (engine_host.py): one
dataclass per message, the engine's states and exit codes, and the one pair of functions that puts messages
on the pipe and takes them off. A new field is added here and nowhere else.

Messages are pickled by the pipe: a step's deltas and stats go as one message (one pickle, one write)."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import RequestDelta
from pagedllm.kv_events import BlockEvents


class EngineState(enum.StrEnum):
    """The engine process as the serving side sees it."""
    STARTING = "starting"  # spawned, loading the model
    UP = "up"  # serving
    HUNG = "hung"  # held work without a step for heartbeat_timeout: being killed
    RESTARTING = "restarting"  # dead, waiting out its backoff
    DOWN = "down"  # died too often: stays down until the model is reloaded
    STOPPED = "stopped"  # shut down on purpose


class EngineExit(enum.IntEnum):
    """Exit codes the engine process chooses (a signal's death is the negative signal number)."""
    SERVING_PROCESS_GONE = 0  # its pipe closed: nothing left to serve
    LOOP_DIED = 70  # the engine loop raised (EX_SOFTWARE): the serving side restarts it
    INJECTED_FAULT = 71  # a test's fault hook ended it


@dataclass(frozen=True, slots=True)
class EngineStats:
    """The engine's counters after a step: the scheduler's queues, the KV cache, speculative decoding."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_draft_tokens: int = 0  # speculative decoding: drafts proposed, and of those, kept
    num_accepted_tokens: int = 0
    running_adapters: tuple[str, ...] = ()  # the LoRA adapters of the running sequences, and of the waiting ones
    waiting_adapters: tuple[str, ...] = ()


# ---- serving process -> engine process ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float | None = None
    lora_name: str | None = None  # one of the engine's adapters (lora_modules), None for the base model


@dataclass(frozen=True, slots=True)
class LoadAdapter:
    """Register LoRA adapter `name` from `path` (checked by the serving side to be inside lora_dir); answered,
    as a request is, by one final delta under `request_id`: an error if it cannot be used."""
    request_id: str
    name: str
    path: str
    pinned: bool = False  # keeps its slot once it has one (lora.py)


@dataclass(frozen=True, slots=True)
class UnloadAdapter:
    """Forget LoRA adapter `name`; answered as LoadAdapter."""
    request_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


# ---- engine process -> serving process ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """The engine is built and serving."""
    num_blocks: int
    max_model_len: int
    compute_path: str
    stats: EngineStats
    block_size: int
    kv_cache_dtype: str  # what the KV cache stores: "int8", or the model's dtype ("bfloat16", ...)


@dataclass(frozen=True, slots=True)
class StartFailed:
    """Building the engine raised; `reason` is the exception, for the model's load error."""
    reason: str


@dataclass(frozen=True, slots=True)
class StepOutput:
    """Deltas for the serving side: a step's (with its stats and end time, the heartbeat), or a refused
    submit's failure (no stats: no step ran)."""
    deltas: list[RequestDelta]
    stats: EngineStats | None = None
    step_time: float | None = None  # wall-clock time the step ended
    block_events: BlockEvents | None = None  # prefix blocks made findable or evicted by the step (kv_events.py)


ToEngine = Submit | LoadAdapter | UnloadAdapter | Abort | Shutdown
FromEngine = Ready | StartFailed | StepOutput


class WireError(RuntimeError):
    """A message of a kind the receiver does not take: the two sides run different code."""


def send(conn: Any, message: ToEngine | FromEngine) -> None:
    conn.send(message)


def receive(conn: Any, kinds: type | tuple[type, ...]) -> Any:
    """The next message, which must be one of `kinds`; raises EOFError/OSError when the pipe is closed."""
    message = conn.recv()
    if not isinstance(message, kinds):
        raise WireError(f"unexpected {type(message).__name__} on the engine pipe")
    return message
