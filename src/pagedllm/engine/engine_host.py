"""The engine process's side of engine_process.py: an EngineLoop fed from the pipe (submits with a constraint
from a thread of their own while it compiles), its deltas sent back in batches, with the engine's stats after
each step (the heartbeat)."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from pagedllm.engine import wire
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.faults import Faults
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.loop import EngineLoop
from pagedllm.engine.sequence import RequestDelta
from pagedllm.errors import EngineDeadError, OverloadedError, RequestError
from pagedllm.kv_events import BlockEvents

logger = logging.getLogger(__name__)


class EngineHost:
    """Every step's deltas go back as one message, with the stats, from the engine thread itself: no
    queue and no extra thread between the step and the pipe (each hop costs on a small machine)."""

    def __init__(self, config: EngineConfig, conn: Any, faults: Faults | None = None) -> None:
        self.config, self.conn, self.faults = config, conn, faults or Faults()
        self.send_lock = threading.Lock()  # the engine thread and the receiving thread both send
        # Submits whose constraint compiles (up to the engine's constraint_compile_timeout) wait on their own
        # thread, so the pipe keeps being read: other submits and aborts go through meanwhile. Request id ->
        # whether it was aborted while its constraint compiled.
        self._compiling: dict[str, bool] = {}
        self._compiling_lock = threading.Lock()
        self._constrained: queue.SimpleQueue[wire.Submit] = queue.SimpleQueue()

    def serve(self) -> None:
        try:
            self.loop = EngineLoop(lambda: LLMEngine(self.config, self.faults), on_step=self._on_step,
                                   on_death=lambda e: os._exit(wire.EngineExit.LOOP_DIED))  # we are restarted
        except BaseException as e:  # noqa: BLE001 (the serving side reports it and fails the model's load)
            wire.send(self.conn, wire.StartFailed(f"{type(e).__name__}: {e}"))
            return
        engine = self.loop.engine
        wire.send(self.conn, wire.Ready(engine.num_blocks, engine.max_model_len, engine.compute_path, engine.stats(),
                                        engine.block_manager.block_size, engine.config.resolved_kv_cache_dtype()))
        self._inject_exit()
        threading.Thread(target=self._submit_constrained, name="pagedllm-constraints", daemon=True).start()
        self._receive()

    def _send(self, deltas: list[RequestDelta], stats: wire.EngineStats | None = None,
              step_time: float | None = None, block_events: BlockEvents | None = None) -> None:
        with self.send_lock:
            wire.send(self.conn, wire.StepOutput(deltas, stats, step_time, block_events))

    def _receive(self) -> None:
        while True:
            try:
                message = wire.receive(self.conn, (wire.Submit, wire.LoadAdapter, wire.UnloadAdapter, wire.Abort,
                                                   wire.Shutdown))
            except (EOFError, OSError):
                os._exit(wire.EngineExit.SERVING_PROCESS_GONE)
            if isinstance(message, wire.Submit) and message.params.structured_outputs is not None:
                with self._compiling_lock:
                    self._compiling[message.request_id] = False
                self._constrained.put(message)
            elif isinstance(message, wire.Submit):
                self._submit(message)
            elif isinstance(message, (wire.LoadAdapter, wire.UnloadAdapter)):
                self.loop.change_adapters(message)
            elif isinstance(message, wire.Abort):
                with self._compiling_lock:
                    if message.request_id in self._compiling:
                        self._compiling[message.request_id] = True
                self.loop.abort(message.request_id)
            else:
                self.loop.shutdown()
                return

    def _submit(self, submit: wire.Submit) -> None:
        """No callback: every delta goes back with its step's (`_on_step`)."""
        try:
            self.loop.submit(submit.request_id, submit.prompt_token_ids, submit.params,
                             arrival_time=submit.arrival_time, lora_name=submit.lora_name)
        except Exception as e:  # the request fails, never the thread that reads the pipe
            if not isinstance(e, (OverloadedError, EngineDeadError, ValueError)):
                logger.exception("submitting request %s failed", submit.request_id)
            self._send([RequestDelta.failure(submit.request_id, RequestError.of(e),
                                             len(submit.prompt_token_ids))])

    def _submit_constrained(self) -> None:
        while True:
            submit = self._constrained.get()
            self._submit(submit)
            with self._compiling_lock:
                aborted = self._compiling.pop(submit.request_id)
            if aborted:  # its abort reached the loop before it did
                self.loop.abort(submit.request_id)

    def _on_step(self, engine: LLMEngine, deltas: list[RequestDelta]) -> None:
        self._send(deltas, engine.stats(), time.time(), engine.block_manager.take_events())

    def _inject_exit(self) -> None:
        delay = self.faults.exit_after_ms
        if delay is not None:
            threading.Timer(delay / 1000, lambda: os._exit(wire.EngineExit.INJECTED_FAULT)).start()
