"""Property tests over random add / abort / step sequences (the threaded online loop: tests/test_loop.py)."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm import SamplingParams
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.faults import Faults
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.sequence import OutputKind

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}


@pytest.fixture(scope="module", params=[None, SPEC], ids=["plain", "speculative"])
def engine(tiny_model_dir, request):
    # A pool of 24 blocks of 4 tokens for prompts up to 40 tokens: preemption and prefix hits both happen;
    # with speculation, a vocabulary of 16 makes the n-gram drafts hit, and be rejected, often.
    model = tiny_model_dir("llama3", vocab_size=None if request.param is None else 16)
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", block_size=4,
                                  num_kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=6,
                                  speculative_config=request.param))


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(3, 8), min_size=1, max_size=40), st.integers(1, 12)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(1, 4)),
), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops)
def test_every_request_answered_once_and_every_block_freed(engine, program):
    finished: dict[str, str] = {}
    added: list[str] = []

    def record(deltas):
        for d in deltas:
            assert d.request_id not in finished, f"{d.request_id} answered after it finished"
            if d.finished:
                finished[d.request_id] = d.finish_reason

    for op in program:
        if op[0] == "add":
            rid = f"r{len(added)}-{id(program)}"
            engine.add_request(rid, op[1], SamplingParams(temperature=0, max_tokens=op[2], ignore_eos=True))
            added.append(rid)
        elif op[0] == "abort" and added:
            delta = engine.abort(added[op[1] % len(added)])
            record([delta] if delta else [])
        else:
            for _ in range(op[1]):
                record(engine.step())
    while engine.has_unfinished_requests():
        record(engine.step())
    assert set(finished) == set(added)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    for block_hash, block_id in engine.block_manager.cached.items():  # prefix hashes cover computed tokens only
        block = engine.block_manager.blocks[block_id]
        assert block.block_hash == block_hash and len(block.token_ids) == engine.block_manager.block_size


def _stream(engine, prompts, params, abort_after_steps=None, output_kind=OutputKind.DELTA):
    deltas: dict[str, list] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, params, output_kind=output_kind)
    steps = 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
        steps += 1
        if steps == abort_after_steps:
            deltas.setdefault("s0", []).append(engine.abort("s0"))
    return deltas


def test_stream_interval_sends_the_first_token_alone_then_chunks_with_nothing_lost(tiny_model_dir):
    prompts = [[5, 9, 13, 21], [7, 3, 40, 41, 42, 2], [11] * 9]
    params = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, logprobs=1)
    config = dict(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4, num_kv_blocks=40)
    every = _stream(LLMEngine(EngineConfig(**config)), prompts, params)
    chunked = _stream(LLMEngine(EngineConfig(**config, stream_interval=4)), prompts, params)
    for rid, deltas in chunked.items():
        assert [len(d.new_token_ids) for d in deltas] == [1, 4, 4, 2]
        assert [len(d.new_logprobs) for d in deltas] == [1, 4, 4, 2]
        assert sum((d.new_token_ids for d in deltas), []) == sum((d.new_token_ids for d in every[rid]), [])
        assert "".join(d.new_text for d in deltas) == "".join(d.new_text for d in every[rid])
        assert deltas[-1].finish_reason == "length" and not any(d.finished for d in deltas[:-1])


def test_a_final_only_request_gets_one_delta_holding_what_the_stream_would(tiny_model_dir):
    prompts = [[5, 9, 13, 21], [7, 3, 40, 41, 42, 2], [11] * 9]
    params = SamplingParams(temperature=0, max_tokens=11, ignore_eos=True, logprobs=1)
    config = dict(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4, num_kv_blocks=40)
    every = _stream(LLMEngine(EngineConfig(**config)), prompts, params)
    final = _stream(LLMEngine(EngineConfig(**config)), prompts, params, output_kind=OutputKind.FINAL_ONLY)
    for rid, (delta,) in final.items():
        assert delta.new_token_ids == sum((d.new_token_ids for d in every[rid]), [])
        assert delta.new_text == "".join(d.new_text for d in every[rid])
        assert len(delta.new_logprobs) == 11 and delta.finish_reason == "length"
    aborted = _stream(LLMEngine(EngineConfig(**config)), prompts[:1], params, abort_after_steps=4,
                      output_kind=OutputKind.FINAL_ONLY)["s0"]
    assert len(aborted) == 1 and aborted[0].finish_reason == "abort" and len(aborted[0].new_token_ids) == 4
    assert aborted[0].new_text == "".join(d.new_text for d in every["s0"][:4])


def test_an_abort_hands_out_the_tokens_still_held_back(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                    num_kv_blocks=40, stream_interval=8))
    deltas = _stream(engine, [[5, 9, 13, 21]], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                     abort_after_steps=4)["s0"]
    assert [len(d.new_token_ids) for d in deltas] == [1, 3]  # the first token, then three held back
    assert deltas[-1].finish_reason == "abort" and deltas[-1].num_output_tokens == 4


def test_stream_interval_must_be_positive():
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)


def test_a_failed_step_fails_only_its_requests_and_the_engine_goes_on(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                    num_kv_blocks=40, max_num_seqs=2), Faults(fail_step_seed=666))
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("bad", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4, seed=666))
    engine.add_request("batched-with-bad", [8, 9], greedy)
    engine.add_request("waiting", [10, 11], greedy)  # max_num_seqs 2: not in the failed step
    deltas = engine.step()
    assert {d.request_id for d in deltas} == {"bad", "batched-with-bad"}
    assert all(d.finished and d.error.code == "internal" and "engine step failed: InjectedFault" in d.error.message
               for d in deltas)
    finished = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            finished[d.request_id] = d if d.finished else finished.get(d.request_id)
    assert finished["waiting"].finish_reason == "length" and finished["waiting"].error is None
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_max_tokens_none_generates_up_to_the_context(tiny_model_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), dtype="float32", block_size=4,
                                    num_kv_blocks=40, max_model_len=24))
    deltas = _stream(engine, [[5, 9, 13, 21]], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert deltas["s0"][-1].finish_reason == "length" and deltas["s0"][-1].num_output_tokens == 24 - 4


def test_preemption_and_abort_amid_drafts_leak_nothing(tiny_model_dir):
    """More prompts than the pool holds, with drafts kept and rejected, one request aborted mid-run."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3", vocab_size=16)), dtype="float32",
                                    block_size=4, num_kv_blocks=24, max_num_batched_tokens=24, max_num_seqs=6,
                                    speculative_config=SPEC))
    rng = random.Random(5)
    for i in range(6):
        engine.add_request(f"r{i}", [rng.randint(3, 8) for _ in range(40)],
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    done, steps = set(), 0
    while engine.has_unfinished_requests():
        for d in engine.step():
            assert d.request_id not in done, f"{d.request_id} answered after it finished"
            done |= {d.request_id} if d.finished else set()
        steps += 1
        if steps == 6:
            done.add(engine.abort("r5").request_id)
    spec = engine.speculator
    assert done == {f"r{i}" for i in range(6)}
    assert engine.num_preemptions > 0 and 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
