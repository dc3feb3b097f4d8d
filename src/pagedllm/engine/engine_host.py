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

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.loop import EngineLoop
from pagedllm.engine.sequence import RequestDelta
from pagedllm.errors import EngineDeadError, OverloadedError, error_code

logger = logging.getLogger(__name__)


class EngineHost:
    """Every step's deltas go back as one message, with the stats, from the engine thread itself: no
    queue and no extra thread between the step and the pipe (each hop costs on a small machine)."""

    def __init__(self, config: EngineConfig, conn: Any) -> None:
        self.config, self.conn = config, conn
        self.send_lock = threading.Lock()  # the engine thread and the receiving thread both send
        # Submits whose constraint compiles (up to the engine's constraint_compile_timeout) wait on their own
        # thread, so the pipe keeps being read: other submits and aborts go through meanwhile. Request id ->
        # whether it was aborted while its constraint compiled.
        self._compiling: dict[str, bool] = {}
        self._compiling_lock = threading.Lock()
        self._constrained: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    def serve(self) -> None:
        try:
            self.loop = EngineLoop(lambda: LLMEngine(self.config), on_step=self._on_step,
                                   on_death=lambda e: os._exit(70))  # a dead loop: the serving side restarts us
        except BaseException as e:  # noqa: BLE001 (the serving side reports it and fails the model's load)
            self.conn.send(("failed", f"{type(e).__name__}: {e}"))
            return
        engine = self.loop.engine
        self.conn.send(("ready", {"num_blocks": engine.num_blocks, "max_model_len": engine.max_model_len,
                                  "compute_path": engine.compute_path, "stats": engine.stats()}))
        self._inject_exit()
        threading.Thread(target=self._submit_constrained, name="pagedllm-constraints", daemon=True).start()
        self._receive()

    def _send(self, deltas: list[RequestDelta], stats: Any = None, last_step: float | None = None) -> None:
        with self.send_lock:
            self.conn.send(("deltas", deltas, stats, last_step))

    def _receive(self) -> None:
        while True:
            try:
                kind, *args = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the serving process is gone
            if kind == "submit" and args[2].structured_outputs is not None:
                with self._compiling_lock:
                    self._compiling[args[0]] = False
                self._constrained.put(args)
            elif kind == "submit":
                self._submit(*args)
            elif kind == "abort":
                with self._compiling_lock:
                    if args[0] in self._compiling:
                        self._compiling[args[0]] = True
                self.loop.abort(args[0])
            elif kind == "shutdown":
                self.loop.shutdown()
                return

    def _submit(self, request_id: str, prompt_ids: list[int], params: Any, arrival: float | None) -> None:
        try:
            self.loop.submit(request_id, prompt_ids, params, _ignore, arrival_time=arrival)
        except Exception as e:  # the request fails, never the thread that reads the pipe
            if not isinstance(e, (OverloadedError, EngineDeadError, ValueError)):
                logger.exception("submitting request %s failed", request_id)
            self._send([RequestDelta.failure(request_id, str(e), error_code(e), len(prompt_ids))])

    def _submit_constrained(self) -> None:
        while True:
            args = self._constrained.get()
            self._submit(*args)
            with self._compiling_lock:
                aborted = self._compiling.pop(args[0])
            if aborted:  # its abort reached the loop before it did
                self.loop.abort(args[0])

    def _on_step(self, engine: LLMEngine, deltas: list[RequestDelta]) -> None:
        self._send(deltas, engine.stats(), time.time())

    def _inject_exit(self) -> None:
        """Tests only: {"exit_after_ms": N} ends the engine process N ms after it is ready."""
        delay = (self.config.fault_injection or {}).get("exit_after_ms")
        if delay is not None:
            threading.Timer(delay / 1000, lambda: os._exit(71)).start()


def _ignore(delta: RequestDelta) -> None:
    """Each request's callback: its deltas already went back with the step's (`_on_step`)."""
