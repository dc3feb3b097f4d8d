"""The engine in a process of its own, beside the Triton model that serves it.

The engine process holds the weights and the KV cache, so it is the one the kernel's OOM killer picks.
When it dies, the serving process is still there to end every request it held with a retryable error
(Triton 2.51 cannot end the streams of a dead Python-backend stub: they stay open until each client
times out). It is then restarted after 1, 2, 4... seconds; `max_restarts` deaths within
`restart_window` seconds and it stays down (restart_policy.py). A hung engine (work waiting, no step for
`heartbeat_timeout` seconds) is killed and handled the same way. Those settings are the SupervisionConfig.

The serving side submits and aborts over a pipe; the engine process answers with deltas and, after
each step, its stats (the heartbeat) and the prefix blocks it made findable or evicted, kept in a
`BlockLog` (kv_events.py) that starts empty, under a new epoch, whenever the engine does."""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pagedllm.engine import wire
from pagedllm.engine.config import EngineConfig, SupervisionConfig
from pagedllm.engine.faults import Faults
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import DeltaCallback, RequestDelta
from pagedllm.engine.wire import EngineState
from pagedllm.errors import EngineDeadError, ErrorCode, RequestError
from pagedllm.kv_events import BlockLog, CacheState, ReplicaLoad
from pagedllm.parent_death import die_with_parent

logger = logging.getLogger(__name__)
WATCH_SECONDS = 0.25


class EngineProcess:
    """`submit` / `abort` / `shutdown` as EngineLoop's. `on_stats(stats, last_step_time)` after each step;
    `on_restart(ready)` once a restarted engine is ready, with what it said (its KV cache's size and dtype);
    `on_give_up(reason)` when it stays down."""

    def __init__(self, config: EngineConfig, supervision: SupervisionConfig | None = None,
                 on_stats: Callable[[wire.EngineStats, float], None] | None = None,
                 on_restart: Callable[[wire.Ready], None] | None = None,
                 on_give_up: Callable[[str], None] | None = None, faults: Faults | None = None) -> None:
        self.config, self.supervision, self.faults = config, supervision or SupervisionConfig(), faults
        self.on_stats, self.on_restart, self.on_give_up = on_stats, on_restart, on_give_up
        self.info: wire.Ready  # what the engine process said once ready (KV blocks and dtype, max_model_len, ...)
        self.restarts, self.policy = 0, self.supervision.restart_policy()
        self.state = EngineState.STARTING
        self.reason = ""
        self._callbacks: dict[str, DeltaCallback] = {}
        self._lock = threading.Lock()
        self._last_progress = self._restart_at = time.monotonic()
        self._start()  # the first start raises what building the engine raised
        threading.Thread(target=self._watch, name="pagedllm-engine-watch", daemon=True).start()

    # ---- the serving side's calls ---------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               callback: DeltaCallback, arrival_time: float | None = None, lora_name: str | None = None) -> None:
        with self._lock:
            if self.state != EngineState.UP:
                raise EngineDeadError(self._refusal())
            if not self._callbacks:
                self._last_progress = time.monotonic()  # idle until now: the heartbeat starts with this work
            self._callbacks[request_id] = callback
            self._send(wire.Submit(request_id, list(prompt_token_ids), params, arrival_time, lora_name))

    def change_adapters(self, change: wire.LoadAdapter | wire.UnloadAdapter, callback: DeltaCallback) -> None:
        """Load or unload a LoRA adapter; `callback` gets the one final delta that says how it went."""
        with self._lock:
            if self.state != EngineState.UP:
                raise EngineDeadError(self._refusal())
            self._callbacks[change.request_id] = callback
            self._send(change)

    def cache_state(self, epoch: str | None, since: int) -> CacheState:
        """The prefix blocks the engine holds, as changes since (epoch, since) or whole (kv_events.py)."""
        stats = self.stats
        return self.blocks.answer(epoch, since, ReplicaLoad(
            stats.num_running, stats.num_waiting, stats.kv_cache_usage, stats.num_blocks,
            self.config.max_loras if self.config.enable_lora else 0, stats.running_adapters, stats.waiting_adapters,
            self.info.kv_cache_dtype))

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self.state == EngineState.UP:
                self._send(wire.Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self.state = EngineState.STOPPED
            self._send(wire.Shutdown())
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()

    def _refusal(self) -> str:
        if self.state == EngineState.DOWN:
            return f"engine died: it stays down ({self.reason}); reload the model to try again"
        return f"engine restarting: the engine process died ({self.reason}); retry shortly"

    def _send(self, message: wire.ToEngine) -> None:
        try:
            wire.send(self.conn, message)
        except (OSError, ValueError):
            pass  # the engine process is gone: the reader thread handles it

    # ---- starting, and the reader thread -------------------------------------------------------
    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        ctx.set_executable(python_executable())
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=run_engine, args=(asdict(self.config), child, self.faults),
                                   name="pagedllm-engine", daemon=True)
        self.process.start()
        child.close()
        first = self._recv_or_exit()
        if not isinstance(first, wire.Ready):
            self.process.join(5)
            raise RuntimeError(f"the engine process failed to start: {first}")
        self.info, self.stats, self.blocks = first, first.stats, BlockLog(first.block_size)
        self.state = EngineState.UP
        self._last_progress = time.monotonic()
        threading.Thread(target=self._read, args=(self.conn, self.process), name="pagedllm-engine-reader",
                         daemon=True).start()

    def _recv_or_exit(self) -> wire.Ready | str:
        """Ready, or why the engine process did not start."""
        try:
            message = wire.receive(self.conn, (wire.Ready, wire.StartFailed))
        except (EOFError, OSError):
            self.process.join(5)
            return describe_exit(self.process.exitcode)
        return message if isinstance(message, wire.Ready) else message.reason

    def _read(self, conn: Any, process: Any) -> None:
        while True:
            try:
                self._deliver(wire.receive(conn, wire.StepOutput))
            except (EOFError, OSError):
                break
        process.join(5)
        if self.state != EngineState.STOPPED:
            self._died(describe_exit(process.exitcode, self.reason if self.state == EngineState.HUNG else ""))

    def _deliver(self, output: wire.StepOutput) -> None:
        if output.block_events is not None:
            self.blocks.record(output.block_events)
        if output.step_time is not None:
            self._last_progress = time.monotonic()
            self.stats = output.stats or self.stats
            if self.on_stats is not None and output.stats is not None:
                self.on_stats(output.stats, output.step_time)
        for delta in output.deltas:
            with self._lock:
                callback = (self._callbacks.pop if delta.finished else self._callbacks.get)(delta.request_id, None)
            if callback is not None:
                callback(delta)

    # ---- death, restarts, and the heartbeat ------------------------------------------------------
    def _died(self, reason: str) -> None:
        with self._lock:
            self.reason, self.state = reason, EngineState.RESTARTING
            failed, self._callbacks = self._callbacks, {}
            self.blocks = BlockLog(self.blocks.block_size)  # its cache died with it: readers start over
            delay = self.policy.on_death(time.monotonic())
        logger.error("engine process died (%s); failing its %d requests", reason, len(failed))
        for request_id, callback in failed.items():
            callback(RequestDelta.failure(request_id, RequestError(ErrorCode.ENGINE_UNAVAILABLE,
                                                                   f"engine died: {reason}; retry the request")))
        deaths, policy = len(self.policy.deaths), self.policy
        if delay is None:
            self.state = EngineState.DOWN
            logger.error("engine died %d times within %.0f s: it stays down; reload the model to try again",
                         deaths, policy.restart_window)
            if self.on_give_up is not None:
                self.on_give_up(reason)
            return
        self._restart_at = time.monotonic() + delay
        logger.warning("restarting the engine process in %.0f s (death %d of at most %d within %.0f s)", delay,
                       deaths, policy.max_restarts, policy.restart_window)

    def _restart(self) -> None:
        """On the watch thread, which lives as long as this object: the engine process dies with the
        thread that started it (PR_SET_PDEATHSIG follows the thread)."""
        self.state = EngineState.STARTING
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 (a failed start counts as one more death)
            self._died(f"restart failed: {e}")
            return
        self.restarts += 1
        logger.warning("engine process restarted (restart %d)", self.restarts)
        if self.on_restart is not None:
            self.on_restart(self.info)

    def _watch(self) -> None:
        """Restarts a dead engine when its backoff is over, and kills one that holds work and has not
        finished a step for `heartbeat_timeout` seconds."""
        while self.state != EngineState.STOPPED:
            time.sleep(WATCH_SECONDS)
            if self.state == EngineState.RESTARTING and time.monotonic() >= self._restart_at:
                self._restart()
            stalled = time.monotonic() - self._last_progress
            if self.state == EngineState.UP and self._callbacks and stalled > self.supervision.heartbeat_timeout:
                self.reason = f"hung: no step for {stalled:.1f} s with work waiting"
                self.state = EngineState.HUNG
                logger.error("engine process %s; killing it", self.reason)
                os.kill(self.process.pid, signal.SIGKILL)
                os.kill(self.process.pid, signal.SIGCONT)  # a stopped process dies only once continued


def describe_exit(code: int | None, reason: str = "") -> str:
    if reason:
        return reason
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    named = {int(e): e.name.lower().replace("_", " ") for e in wire.EngineExit}
    return f"exited with code {code}" + (f" ({named[code]})" if code in named else "")


def python_executable() -> str:
    """The interpreter to start the engine process with. Inside Triton's Python stub `sys.executable` is
    the stub binary, so this environment's own python is looked for first."""
    for candidate in (Path(sys.prefix) / "bin" / "python3", Path(sys.executable)):
        if candidate.name.startswith("python") and candidate.exists():
            return str(candidate)
    return shutil.which("python3") or sys.executable


# ---- inside the engine process ---------------------------------------------------------------------
def run_engine(config: dict[str, Any], conn: Any, faults: Faults | None = None) -> None:
    die_with_parent()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a Ctrl-C or stop sent to the group: the serving side decides
        signal.signal(sig, signal.SIG_IGN)
    from pagedllm.engine.engine_host import EngineHost
    EngineHost(EngineConfig(**config), conn, faults).serve()

