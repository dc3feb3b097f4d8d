"""The block manager (engine/block_manager.py) on fake sequences, no model: allocation, prefix hits,
reference counts and the order free blocks are evicted in."""
from __future__ import annotations

import pytest

from pagedllm.engine.block_manager import BlockManager
from pagedllm.kv_events import block_hashes
from tests.support.fakes import fake_sequence

BLOCK = 4


def computed(bm: BlockManager, seq, n: int | None = None):
    """Allocate and mark `n` (default: all) of the sequence's tokens computed, registering full blocks."""
    n = len(seq.token_ids) if n is None else n
    bm.allocate(seq, n)
    seq.num_computed_tokens = n
    bm.register_full_blocks(seq)
    return seq


def test_allocation_takes_whole_blocks_for_the_new_tokens():
    bm = BlockManager(8, BLOCK)
    seq = fake_sequence("a", list(range(10)))
    assert bm.blocks_needed(seq, 10) == 3 and bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    seq.num_computed_tokens = 10
    assert bm.blocks_needed(seq, 2) == 0 and bm.blocks_needed(seq, 3) == 1
    assert not bm.can_allocate(fake_sequence("b", list(range(40))), 40)


def test_a_later_prompt_reuses_the_full_blocks_of_an_earlier_one():
    bm = BlockManager(8, BLOCK)
    first = computed(bm, fake_sequence("a", list(range(10))))
    bm.free_sequence(first)
    second = fake_sequence("b", list(range(8)) + [50, 51, 52])
    bm.match_prefix(second)
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert second.block_table == first_blocks(bm, list(range(8)))
    assert (bm.prefix_queries, bm.prefix_hits) == (11, 8)


def first_blocks(bm: BlockManager, tokens: list[int]) -> list[int]:
    return [bm.cached[h] for h in _hashes(tokens)]


def _hashes(tokens: list[int]) -> list[int]:
    return block_hashes(tokens, BLOCK)


def test_the_last_prompt_token_is_always_recomputed():
    bm = BlockManager(8, BLOCK)
    bm.free_sequence(computed(bm, fake_sequence("a", list(range(8)))))
    again = fake_sequence("b", list(range(8)))
    bm.match_prefix(again)
    assert again.num_computed_tokens == 4  # its logits are needed: the second block is computed again


def test_shared_blocks_are_counted_and_freed_only_by_the_last_user():
    bm = BlockManager(8, BLOCK)
    bm.free_sequence(computed(bm, fake_sequence("a", list(range(9)))))
    b, c = fake_sequence("b", list(range(9))), fake_sequence("c", list(range(9)))
    bm.match_prefix(b)
    bm.match_prefix(c)
    shared = b.block_table[0]
    assert c.block_table[0] == shared and bm.blocks[shared].ref_count == 2 and shared not in bm.free
    bm.free_sequence(b)
    assert shared not in bm.free
    bm.free_sequence(c)
    assert shared in bm.free
    with pytest.raises(AssertionError, match="freed twice"):
        c.block_table = [shared]
        bm.free_sequence(c)


def test_free_blocks_are_evicted_least_recently_freed_first_tail_before_head():
    bm = BlockManager(3, BLOCK)
    prompt = list(range(12))
    seq = computed(bm, fake_sequence("a", prompt))
    head, middle, tail = seq.block_table
    bm.free_sequence(seq)
    taker = fake_sequence("b", [70] * 4)
    bm.allocate(taker, 4)
    assert taker.block_table == [tail]  # the tail went first; the head and middle stay findable
    again = fake_sequence("c", prompt[:8] + [1])
    bm.match_prefix(again)
    assert again.block_table == [head, middle]


def test_a_sequences_later_blocks_run_up_through_memory_from_among_the_least_recently_freed():
    bm = BlockManager(100, BLOCK)
    prompt = list(range(400))
    first = computed(bm, fake_sequence("a", prompt))
    assert first.block_table == list(range(100))
    bm.free_sequence(first)  # the free list now runs 99, 98, ..., 0: tail first
    taker = computed(bm, fake_sequence("b", [70] * 40))
    assert taker.block_table == list(range(84, 94))  # ascending, from among the 16 least recently freed
    bm.allocate(taker, 4)  # as it grows: the block after its last, the 16 least recently freed being 99-94, 83-74
    assert taker.block_table[-1] == 94
    again = fake_sequence("c", prompt[:8] + [1])
    bm.match_prefix(again)
    assert again.block_table == [0, 1]  # the head stays findable


def test_with_few_blocks_free_a_sequence_takes_them_strictly_least_recently_freed_first():
    bm = BlockManager(8, BLOCK)
    prompt = list(range(16))
    bm.free_sequence(computed(bm, fake_sequence("a", prompt)))  # free: 4, 5, 6, 7, then 3, 2, 1, 0
    taker = computed(bm, fake_sequence("b", [70] * 24))
    assert taker.block_table == [4, 5, 6, 7, 3, 2]
    again = fake_sequence("c", prompt[:8] + [1])
    bm.match_prefix(again)
    assert again.block_table == [0, 1]


def test_without_prefix_caching_nothing_is_shared():
    bm = BlockManager(8, BLOCK, enable_prefix_caching=False)
    bm.free_sequence(computed(bm, fake_sequence("a", list(range(9)))))
    again = fake_sequence("b", list(range(9)))
    bm.match_prefix(again)
    assert again.block_table == [] and not bm.cached


def test_blocks_made_findable_and_evicted_are_reported_once_as_the_net_change():
    bm = BlockManager(4, BLOCK)
    assert bm.take_events() is None
    first = computed(bm, fake_sequence("a", list(range(10))))  # two full blocks, one partial
    events = bm.take_events()
    assert events.stored == tuple(_hashes(list(range(8)))) and events.evicted == ()
    assert bm.take_events() is None
    bm.free_sequence(first)
    assert bm.take_events() is None  # freed blocks stay findable
    computed(bm, fake_sequence("b", list(range(100, 116))))  # needs all 4 blocks: both cached ones are evicted
    events = bm.take_events()
    assert set(events.evicted) == set(_hashes(list(range(8))))
    assert events.stored == tuple(_hashes(list(range(100, 116))))
    assert set(bm.cached) == set(events.stored)


def test_a_block_stored_and_evicted_within_one_step_is_reported_evicted():
    bm = BlockManager(1, BLOCK)
    bm.free_sequence(computed(bm, fake_sequence("a", [1, 2, 3, 4])))
    computed(bm, fake_sequence("b", [5, 6, 7, 8]))
    events = bm.take_events()
    assert events.evicted == tuple(_hashes([1, 2, 3, 4])) and events.stored == tuple(_hashes([5, 6, 7, 8]))
