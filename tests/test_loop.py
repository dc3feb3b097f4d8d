"""EngineLoop: deltas delivered to each request's callback from the loop's own thread, submits and aborts
from any thread, bounded admission, a failed build or a dead loop reported, and requests without a callback
seen by `on_step` only (how the engine process sends them back)."""
from __future__ import annotations

import queue
import threading

import pytest

from pagedllm import SamplingParams
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.faults import Faults
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.loop import EngineLoop


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                  num_kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=6))


def test_a_request_without_a_callback_reaches_on_step_only(engine):
    seen: queue.Queue = queue.Queue()
    loop = EngineLoop(lambda: engine, on_step=lambda e, deltas: [seen.put(d) for d in deltas])
    try:
        loop.submit("quiet", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        deltas = [seen.get(timeout=30)]
        while not deltas[-1].finished:
            deltas.append(seen.get(timeout=30))
        assert sum(len(d.new_token_ids) for d in deltas) == 3 and deltas[-1].finish_reason == "length"
        assert loop._callbacks == {}
    finally:
        loop.shutdown()


def test_loop_streams_deltas_from_many_threads(engine):
    loop = EngineLoop(lambda: engine)
    try:
        results: dict[str, queue.Queue] = {}
        for i in range(8):
            results[str(i)] = q = queue.Queue()
            loop.submit(str(i), [5 + i] * (3 + i), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), q.put)
        loop.abort("3")
        for rid, q in results.items():
            deltas = []
            while not (deltas and deltas[-1].finished):
                deltas.append(q.get(timeout=30))
            expected = "abort" if rid == "3" else "length"
            assert deltas[-1].finish_reason == expected or (rid == "3" and deltas[-1].finish_reason == "length")
            if deltas[-1].finish_reason == "length":
                assert sum(len(d.new_token_ids) for d in deltas) == 6
        with pytest.raises(ValueError, match="max_tokens"):
            SamplingParams(max_tokens=0)
        with pytest.raises(ValueError, match="prompt"):
            loop.submit("bad", [], SamplingParams(), lambda d: None)
        assert loop.alive
    finally:
        loop.shutdown()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_the_loop_builds_its_engine_on_its_own_thread_and_reports_a_failed_build(engine):
    # One thread does all torch work: libgomp throttles spin-waiting once two threads hold OpenMP pools.
    built_on = []
    loop = EngineLoop(lambda: built_on.append(threading.current_thread()) or engine)
    try:
        assert loop.engine is engine and built_on == [loop._thread] and built_on[0] is not threading.main_thread()
    finally:
        loop.shutdown()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        EngineLoop(lambda: open("/nowhere/engine.json"))


def test_admission_refuses_past_the_bound_and_serves_what_it_took(tiny_model_dir):
    from pagedllm.errors import OverloadedError
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                    num_kv_blocks=40, max_num_seqs=2, max_waiting_requests=3,
                                    max_queued_tokens=10_000))
    loop = EngineLoop(lambda: engine)
    accepted, refused = {}, 0
    try:
        for i in range(20):
            q = queue.Queue()
            try:
                loop.submit(str(i), [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), q.put)
                accepted[str(i)] = q
            except OverloadedError as e:
                assert "retry later" in str(e)
                refused += 1
        assert refused > 0 and len(accepted) >= 3
        for q in accepted.values():
            deltas = [q.get(timeout=60)]
            while not deltas[-1].finished:
                deltas.append(q.get(timeout=60))
            assert deltas[-1].finish_reason == "length"
    finally:
        loop.shutdown()


def test_a_dead_loop_fails_what_it_holds_refuses_new_work_and_reports_death(tiny_model_dir):
    from pagedllm.errors import EngineDeadError
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                    num_kv_blocks=40), Faults(kill_loop_seed=999))
    died = queue.Queue()
    loop = EngineLoop(lambda: engine, on_death=died.put)
    q = queue.Queue()
    loop.submit("long", [5, 6], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), q.put)
    loop.submit("killer", [7, 8], SamplingParams(temperature=0, max_tokens=2, seed=999), q.put)
    assert "kill_loop_seed" in str(died.get(timeout=30))
    errors = [q.get(timeout=5) for _ in range(2)]
    assert all(d.finished and d.error.code == "internal" for d in errors)
    assert not loop.alive
    with pytest.raises(EngineDeadError, match="not ready"):
        loop.submit("late", [5], SamplingParams(max_tokens=1), q.put)
