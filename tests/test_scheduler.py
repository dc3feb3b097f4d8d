"""The scheduler (engine/scheduler.py) on fake sequences, no model: the token budget, chunked prefill,
running requests before waiting ones, max_num_seqs, and which request is preempted when blocks run out."""
from __future__ import annotations

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.sequence import SequenceStatus
from tests.support.fakes import fake_sequence, run_step

BLOCK = 4


def scheduler(num_blocks: int = 32, max_num_seqs: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK, enable_prefix_caching=False), max_num_seqs, budget)


def plan(out) -> list[tuple[str, int]]:
    return [(seq.request_id, n) for seq, n in out.scheduled]


def test_prompts_are_chunked_to_the_token_budget_and_finish_next_step():
    s = scheduler(budget=8)
    a, b = fake_sequence("a", list(range(6))), fake_sequence("b", list(range(6)))
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert plan(first) == [("a", 6), ("b", 2)] and first.num_batched_tokens == 8
    run_step(first)
    assert plan(s.schedule()) == [("a", 1), ("b", 4)]  # running first: a decodes, b's prompt goes on


def test_running_requests_come_before_waiting_ones_within_max_num_seqs():
    s = scheduler(max_num_seqs=2, budget=64)
    for rid in "abc":
        s.add(fake_sequence(rid, list(range(5))))
    out = s.schedule()
    assert plan(out) == [("a", 5), ("b", 5)] and [q.request_id for q in s.waiting] == ["c"]
    run_step(out)
    assert plan(s.schedule()) == [("a", 1), ("b", 1)]  # c waits for a free seat
    s.remove(s.running[0])
    assert plan(s.schedule())[-1] == ("c", 5)


def test_the_newest_running_request_is_preempted_when_blocks_run_out():
    s = scheduler(num_blocks=4, budget=64)
    a, b = fake_sequence("a", list(range(8))), fake_sequence("b", list(range(7)))
    s.add(a)
    s.add(b)
    run_step(s.schedule())  # a holds 2 blocks, b 2: all 4; a's next token needs a fifth
    waiting_before = fake_sequence("c", [1])
    s.add(waiting_before)
    out = s.schedule()
    assert out.num_preempted == 1 and plan(out) == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert [q.request_id for q in s.waiting] == ["b", "c"]  # b goes back to the front; none admitted this step
    assert s.block_manager.num_free_blocks == 1


def test_a_prompt_that_does_not_fit_waits_and_holds_nothing():
    s = scheduler(num_blocks=2, budget=64)
    big = fake_sequence("big", list(range(12)))
    s.add(big)
    assert not s.schedule().scheduled and big.block_table == [] and s.block_manager.num_free_blocks == 2


def test_remove_releases_a_sequences_blocks_wherever_it_is():
    s = scheduler()
    a = fake_sequence("a", list(range(9)))
    s.add(a)
    run_step(s.schedule())
    s.remove(a)
    assert not s.has_unfinished and s.block_manager.num_free_blocks == 32
