"""The engine in its own process: requests served across the pipe; a killed engine process fails its
requests at once as retryable and is restarted; a hung one is detected by the heartbeat; one that keeps
dying stays down. Real processes and real signals, a tiny model."""
from __future__ import annotations

import os
import queue
import signal
import time

import pytest

from pagedllm.engine.config import EngineConfig, SupervisionConfig
from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.faults import Faults
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.errors import EngineDeadError
from pagedllm.kv_events import block_hashes

LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)


def config(tiny_model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(tiny_model_dir("llama-tied")), dtype="float32", block_size=4, num_kv_blocks=256,
                        max_model_len=512, **kw)


def run(engine: EngineProcess, request_id: str, params: SamplingParams = LONG) -> queue.Queue:
    deltas: queue.Queue = queue.Queue()
    engine.submit(request_id, [5, 6, 7], params, deltas.put)
    return deltas


def final(deltas: queue.Queue, timeout: float = 30.0):
    while True:
        delta = deltas.get(timeout=timeout)
        if delta.finished:
            return delta


def wait_until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def engine(tiny_model_dir):
    restarted = []
    e = EngineProcess(config(tiny_model_dir), SupervisionConfig(heartbeat_timeout=1.0),
                      on_restart=restarted.append)
    e.restarted = restarted
    yield e
    e.shutdown()


def test_serves_across_the_pipe(engine):
    done = final(run(engine, "a", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)))
    assert done.finish_reason == "length" and done.num_output_tokens == 8 and done.error is None


def test_the_prefix_blocks_it_holds_are_reported_as_they_change(engine):
    prompt = list(range(5, 18))
    deltas: queue.Queue = queue.Queue()
    engine.submit("p", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), deltas.put)
    final(deltas)
    state = engine.cache_state(None, 0)
    assert state.reset and state.block_size == 4 and set(block_hashes(prompt, 4)) <= set(state.stored)
    assert state.load.num_blocks == 256 and state.load.num_running == 0
    assert state.load.kv_cache_dtype == engine.info.kv_cache_dtype == "float32"  # the model's: no int8 asked
    again = engine.cache_state(state.epoch, state.seq)
    assert not again.reset and again.stored == again.evicted == []


def test_a_killed_engine_fails_its_requests_as_retryable_and_comes_back(engine):
    first, second = run(engine, "a"), run(engine, "b")
    first.get(timeout=30)  # streaming
    before = engine.cache_state(None, 0)
    start = time.monotonic()
    os.kill(engine.process.pid, signal.SIGKILL)
    failed = [final(first), final(second)]
    assert time.monotonic() - start < 2.0
    assert all(d.error.code == "engine_unavailable" and "engine died: killed by SIGKILL" in d.error.message
               for d in failed)
    with pytest.raises(EngineDeadError, match="engine restarting"):
        run(engine, "c")
    assert wait_until(lambda: engine.state == "up" and engine.restarted == [engine.info])  # told its new Ready
    restarted = engine.cache_state(before.epoch, before.seq)  # its blocks died with it: a reader starts over
    assert restarted.reset and restarted.epoch != before.epoch and restarted.stored == []
    assert final(run(engine, "d", SamplingParams(max_tokens=3))).error is None


def test_a_hung_engine_is_killed_by_the_heartbeat_and_restarted(engine):
    deltas = run(engine, "a")
    deltas.get(timeout=30)
    os.kill(engine.process.pid, signal.SIGSTOP)
    done = final(deltas, timeout=10)
    assert done.error.code == "engine_unavailable" and "hung: no step for" in done.error.message
    assert wait_until(lambda: engine.state == "up")
    assert final(run(engine, "b", SamplingParams(max_tokens=3))).error is None


def test_an_engine_that_keeps_dying_stays_down(tiny_model_dir):
    gave_up = []
    e = EngineProcess(config(tiny_model_dir), SupervisionConfig(max_restarts=1), on_give_up=gave_up.append,
                      faults=Faults(exit_after_ms=300))
    try:
        # the state reads down a moment before on_give_up runs (on the watch thread): wait for both
        assert wait_until(lambda: e.state == "down" and gave_up, 60) and "exited with code 71" in gave_up[0]
        with pytest.raises(EngineDeadError, match="stays down"):
            run(e, "a")
    finally:
        e.shutdown()
