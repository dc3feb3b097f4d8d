"""kv_events.py: the block hash the engine and the gateway share, the serving side's BlockLog and a reader's
HeldBlocks, which must end up holding what the engine holds whatever order the reader polls in."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.kv_events import (
    ROOT,
    BlockEvents,
    BlockLog,
    CacheState,
    HeldBlocks,
    ReplicaLoad,
    block_hashes,
    chain_hash,
    parse_query,
)


def test_the_hash_is_fixed_across_processes_and_versions():
    # pinned: the gateway and every replica must compute the same value, whatever runs them
    assert chain_hash(ROOT, [1, 2, 3, 4]) == chain_hash(ROOT, (1, 2, 3, 4)) == 0x09222804E3E39BA2
    assert chain_hash(ROOT, [1, 2, 3, 4]) != chain_hash(1, [1, 2, 3, 4])  # an adapter's root
    assert chain_hash(ROOT, [1, 2, 3, 4]) != chain_hash(ROOT, [1, 2, 3, 5])


def test_a_prompt_has_a_hash_per_full_block_each_chained_on_the_last():
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert hashes == [chain_hash(ROOT, [0, 1, 2, 3]), chain_hash(hashes[0], [4, 5, 6, 7])]
    assert block_hashes(tokens[:3], 4) == [] and block_hashes(tokens[:8], 4) == hashes
    assert block_hashes(tokens, 4, root=7)[0] != hashes[0]


def test_a_state_crosses_json_exactly():
    load = ReplicaLoad(2, 1, 0.25, 64, 4, ("sql",), ("poet", "sql"), kv_cache_dtype="int8")
    state = CacheState("e1", 3, 16, False, [0, 2**64 - 1], [5], load)
    assert CacheState.from_json(state.to_json()) == state
    with pytest.raises(ValueError, match="not a cache state"):
        CacheState.from_json('{"epoch": "e1"}')


def test_a_load_from_a_replica_that_does_not_say_its_kv_cache_dtype_reads_as_auto():
    """A replica of an earlier version leaves the field out: its cache holds the model's dtype, vLLM's "auto"."""
    load = ReplicaLoad(2, 1, 0.25, 64, kv_cache_dtype="int8")
    data = json.loads(CacheState("e1", 3, 16, True, [], [], load).to_json())
    del data["load"]["kv_cache_dtype"]
    assert CacheState.from_json(json.dumps(data)).load == ReplicaLoad(2, 1, 0.25, 64, kv_cache_dtype="auto")


@pytest.mark.parametrize("text, message", [
    ("[1]", "expected"), ('{"since": -1}', "since"), ('{"epoch": 3}', "epoch"), ('{"since": 1, "x": 2}', "expected"),
    ("{", "not valid JSON"), ("x" * 2000, "longer than"),
])
def test_a_bad_query_is_refused_saying_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_query(text)


def test_a_reader_gets_the_changes_since_its_seq_or_everything_after_a_restart():
    log = BlockLog(16)
    reader = HeldBlocks()
    first = log.answer(None, 0)
    assert first.reset and first.stored == [] and reader.apply(first)  # new to the reader: a restart
    log.record(BlockEvents(stored=(1, 2, 3)))
    log.record(BlockEvents(stored=(4,), evicted=(2,)))
    delta = log.answer(**reader.query())
    assert not delta.reset and sorted(delta.stored) == [1, 3, 4] and delta.evicted == [2]
    assert not reader.apply(delta) and reader.hashes == {1, 3, 4}
    assert log.answer(**reader.query()).stored == []  # nothing new
    restarted = BlockLog(16)
    restarted.record(BlockEvents(stored=(8,)))
    state = restarted.answer(**reader.query())
    assert state.reset and reader.apply(state) and reader.hashes == {8}


def test_a_reader_that_fell_behind_the_kept_steps_gets_everything():
    log = BlockLog(16, keep_steps=2)
    reader = HeldBlocks()
    reader.apply(log.answer(None, 0))
    for h in range(5):
        log.record(BlockEvents(stored=(h,)))
    state = log.answer(**reader.query())
    assert state.reset and sorted(state.stored) == [0, 1, 2, 3, 4]


steps = st.lists(st.tuples(st.sets(st.integers(0, 20)), st.sets(st.integers(0, 20)), st.booleans()), max_size=30)


@settings(max_examples=150, deadline=None)
@given(steps)
def test_a_reader_holds_what_the_engine_holds_however_often_it_polls(script):
    log, reader, engine = BlockLog(16, keep_steps=4), HeldBlocks(), set()
    for stored, evicted, poll in script:
        evicted = (evicted & engine) - stored  # the engine evicts only what it holds; a step's change is net
        events = BlockEvents(tuple(stored - engine), tuple(evicted))
        engine = (engine - evicted) | stored
        log.record(events)
        if poll:
            reader.apply(log.answer(**reader.query()))
    reader.apply(log.answer(**reader.query()))
    assert reader.hashes == engine == log.held
