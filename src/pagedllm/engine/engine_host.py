"""The engine process's side of engine_process.py: an EngineLoop fed from the pipe, and one thread that
sends its deltas back in batches, with the engine's stats after each step (the heartbeat)."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.loop import EngineDeadError, EngineLoop, OverloadedError
from pagedllm.engine.sequence import RequestDelta

logger = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, config: EngineConfig, conn: Any) -> None:
        self.config, self.conn = config, conn
        self.outbox: queue.SimpleQueue[RequestDelta | None] = queue.SimpleQueue()
        self.stats: Any = None
        self.last_step: float | None = None

    def serve(self) -> None:
        try:
            self.loop = EngineLoop(lambda: LLMEngine(self.config), on_step=self._on_step,
                                   on_death=lambda e: os._exit(70))  # a dead loop: the serving side restarts us
        except BaseException as e:  # noqa: BLE001 (the serving side reports it and fails the model's load)
            self.conn.send(("failed", f"{type(e).__name__}: {e}"))
            return
        engine = self.loop.engine
        self.conn.send(("ready", {"num_blocks": engine.num_blocks, "max_model_len": engine.max_model_len,
                                  "stats": engine.stats()}))
        threading.Thread(target=self._send_deltas, name="pagedllm-engine-sender", daemon=True).start()
        self._inject_exit()
        self._receive()

    def _receive(self) -> None:
        while True:
            try:
                kind, *args = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the serving process is gone
            if kind == "submit":
                self._submit(*args)
            elif kind == "abort":
                self.loop.abort(args[0])
            elif kind == "shutdown":
                self.loop.shutdown()
                self.outbox.put(None)
                return

    def _submit(self, request_id: str, prompt_ids: list[int], params: Any, arrival: float | None) -> None:
        try:
            self.loop.submit(request_id, prompt_ids, params, self.outbox.put, arrival_time=arrival)
        except (OverloadedError, EngineDeadError, ValueError) as e:
            code = "INVALID_ARG" if isinstance(e, ValueError) else "UNAVAILABLE"
            self.outbox.put(RequestDelta(request_id, [], "", "abort", len(prompt_ids), 0, error=str(e),
                                         error_code=code))

    def _on_step(self, engine: LLMEngine, _: list[RequestDelta]) -> None:
        self.stats, self.last_step = engine.stats(), time.time()

    def _send_deltas(self) -> None:
        """Whatever waits goes out as one message; the stats travel with it whenever a step ran since."""
        sent_step = None
        while True:
            try:
                batch = [self.outbox.get(timeout=0.05)]
            except queue.Empty:
                batch = []
            while not self.outbox.empty():
                batch.append(self.outbox.get_nowait())
            if None in batch:
                return
            step = self.last_step if self.last_step != sent_step else None
            if batch or step is not None:
                self.conn.send(("deltas", batch, self.stats, step))
                sent_step = self.last_step

    def _inject_exit(self) -> None:
        """Tests only: {"exit_after_ms": N} ends the engine process N ms after it is ready."""
        delay = (self.config.fault_injection or {}).get("exit_after_ms")
        if delay is not None:
            threading.Timer(delay / 1000, lambda: os._exit(71)).start()
