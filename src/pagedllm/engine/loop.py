"""EngineLoop: runs LLMEngine.step on a background thread and delivers each request's deltas to its
callback as they are produced. Thread-safe: submit and abort may be called from any thread.

The engine is built on the loop's own thread, so one thread does all of its torch work. libgomp (torch's
OpenMP on Linux) gives each thread that starts parallel regions its own pool, and once the pools hold more
threads than there are CPUs it all but stops spin-waiting: every parallel region then pays a futex wake-up.
Measured on 2 cores, a model loaded on one thread and stepped on another ran a batch-1 linear layer 4x
slower and served 0.55x the offline throughput."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pagedllm.engine import wire
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.lora import LoRARequest
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import DeltaCallback, FinishReason, RequestDelta
from pagedllm.errors import EngineDeadError, ErrorCode, OverloadedError, RequestError

logger = logging.getLogger(__name__)


@dataclass
class _Submit:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    callback: DeltaCallback | None
    arrival_time: float | None
    lora_name: str | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _AdapterChange:
    """wire.LoadAdapter or wire.UnloadAdapter, made on the engine thread (the bank's slots are its)."""
    change: wire.LoadAdapter | wire.UnloadAdapter


class EngineLoop:
    """`build` makes the engine on the loop's thread; the constructor returns once it is ready, or raises
    what building it raised."""

    def __init__(self, build: Callable[[], LLMEngine],
                 on_step: Callable[[LLMEngine, list[RequestDelta]], None] | None = None,
                 on_death: Callable[[BaseException], None] | None = None) -> None:
        self.on_step = on_step
        self.on_death = on_death
        self._callbacks: dict[str, DeltaCallback] = {}
        self._inbox: list[_Submit | _Abort | _AdapterChange] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._waiting, self._waiting_tokens = 0, 0  # the engine's queue as of its last step
        self.error: BaseException | None = None
        self.engine: LLMEngine
        built: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(build, built.put), name="pagedllm-engine", daemon=True)
        self._thread.start()
        failure = built.get()
        if failure is not None:
            raise failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               callback: DeltaCallback | None = None, arrival_time: float | None = None,
               lora_name: str | None = None) -> None:
        """Validate and admit now (raising in the caller's thread), then queue for the next step. Without a
        `callback` the request's deltas reach only `on_step`."""
        self.engine.validate(prompt_token_ids, params)
        with self._cond:
            if not self.alive or self._stopping:
                raise EngineDeadError("the engine loop is not running; the model is not ready")
            self._admit(len(prompt_token_ids))
            self._inbox.append(_Submit(request_id, list(prompt_token_ids), params, callback, arrival_time, lora_name))
            self._cond.notify()

    def _admit(self, num_tokens: int) -> None:
        queued = [item for item in self._inbox if isinstance(item, _Submit)]
        waiting = self._waiting + len(queued)
        tokens = self._waiting_tokens + sum(len(item.prompt_token_ids) for item in queued) + num_tokens
        config = self.engine.config
        if waiting >= config.max_waiting_requests or tokens > config.max_queued_tokens:
            raise OverloadedError(f"{waiting} requests and {tokens} prompt tokens waiting (limits "
                                  f"{config.max_waiting_requests} and {config.max_queued_tokens}); retry later")

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify()

    def change_adapters(self, change: wire.LoadAdapter | wire.UnloadAdapter) -> None:
        """A wire.LoadAdapter or wire.UnloadAdapter, made before the next step; its final delta reaches on_step."""
        with self._cond:
            self._inbox.append(_AdapterChange(change))
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self, build: Callable[[], LLMEngine], built: Callable[[BaseException | None], None]) -> None:
        try:
            self.engine = build()
        except BaseException as e:
            built(e)
            return
        built(None)
        try:
            while self._wait_for_work():
                self._drain_inbox()
                deltas = self.engine.step()
                with self._cond:
                    self._waiting = len(self.engine.scheduler.waiting)
                    self._waiting_tokens = self.engine.scheduler.num_waiting_tokens
                self._deliver(deltas)
        except BaseException as e:  # the loop must never die silently: fail everything it holds
            logger.exception("engine loop died")
            self.error = e
            self._fail_all(f"engine failed: {e}")
            if self.on_death is not None:
                self.on_death(e)

    def _wait_for_work(self) -> bool:
        with self._cond:
            while not self._stopping and not self._inbox and not self.engine.has_unfinished_requests():
                self._cond.wait()
            return not self._stopping

    def _drain_inbox(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        for item in inbox:
            if isinstance(item, _AdapterChange):
                self._deliver([self._change_adapters(item.change)])
                continue
            if isinstance(item, _Abort):
                delta = self.engine.abort(item.request_id)
                if delta is not None:
                    self._deliver([delta])
                continue
            try:
                self.engine.add_request(item.request_id, item.prompt_token_ids, item.params, item.arrival_time,
                                        LoRARequest(item.lora_name) if item.lora_name else None)
                if item.callback is not None:
                    self._callbacks[item.request_id] = item.callback
            except ValueError as e:
                self._deliver([RequestDelta.failure(item.request_id, RequestError.of(e),
                                                    len(item.prompt_token_ids))], item.callback)

    def _change_adapters(self, change: wire.LoadAdapter | wire.UnloadAdapter) -> RequestDelta:
        try:
            if isinstance(change, wire.LoadAdapter):
                self.engine.load_lora(LoRARequest(change.name, change.path), change.pinned)
            else:
                self.engine.unload_lora(change.name)
        except ValueError as e:
            return RequestDelta.failure(change.request_id, RequestError.of(e))
        return RequestDelta(request_id=change.request_id, new_token_ids=[], new_text="",
                            finish_reason=FinishReason.STOP, num_prompt_tokens=0, num_output_tokens=0)

    def _deliver(self, deltas: list[RequestDelta], callback: DeltaCallback | None = None) -> None:
        """`on_step` sees every delta handed out (with the stats), then each request's callback gets its own."""
        if self.on_step is not None:
            self.on_step(self.engine, deltas)
        for delta in deltas:
            pop = self._callbacks.pop if delta.finished else self._callbacks.get
            target = pop(delta.request_id, None) or callback
            if target is not None:
                _safe_call(target, delta)

    def _fail_all(self, message: str) -> None:
        for request_id, callback in list(self._callbacks.items()):
            _safe_call(callback, RequestDelta.failure(request_id, RequestError(ErrorCode.INTERNAL, message)))
        self._callbacks.clear()


def _safe_call(callback: DeltaCallback, delta: RequestDelta) -> None:
    try:
        callback(delta)
    except Exception:  # a broken client callback must not take the engine down
        logger.exception("delta callback for request %s failed", delta.request_id)
