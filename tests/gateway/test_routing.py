"""routing.py's choice of replica on fake replicas and a fake clock: prefix hits against load, the imbalance bound,
ties, a restarted engine, evictions, a replica that does not report its blocks, and the pending prompts that let
a burst follow its first request."""
from __future__ import annotations

from pagedllm.gateway.config import RoutingConfig
from pagedllm.gateway.replicas import Replica
from pagedllm.gateway.routing import Prompt, Router, RouteReason
from pagedllm.kv_events import CacheState, block_hashes

BLOCK = 16
SYSTEM = list(range(1000, 1000 + 40 * BLOCK))  # a 640-token shared head
NOW = 1000.0


def replicas(n: int = 2) -> list[Replica]:
    found = [Replica(f"r{i}:1") for i in range(n)]
    for r in found:
        r.healthy, r.models = True, {"llm"}
        report(r, [])
    return found


def report(replica: Replica, stored: list[int], evicted: list[int] = (), epoch: str = "e", reset: bool = True) -> None:
    index = replica.prefix_index("llm")
    index.update(CacheState(epoch, index.held.seq + 1, BLOCK, reset, stored, list(evicted)))


def holding(replica: Replica, tokens: list[int]) -> None:
    report(replica, block_hashes(tokens, BLOCK), reset=False)


def prompt(tokens: list[int], user: str | None = None) -> Prompt:
    return Prompt(tokens, user)


def router(**settings) -> Router:
    return Router(RoutingConfig(tokenizers={"llm": "unused"}, **settings))


def test_the_replica_holding_the_prompts_head_is_chosen_over_an_idle_one():
    a, b = replicas()
    holding(b, SYSTEM)
    b.outstanding = 1
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1, 2, 3]), NOW)
    assert route.replica is b and route.reason is RouteReason.CACHE_HIT and route.cached_tokens == len(SYSTEM)


def test_load_outweighs_a_prefix_worth_less_than_the_requests_in_flight():
    a, b = replicas()
    holding(b, SYSTEM)
    b.outstanding = 2  # 2 x 512 tokens of load against 640 cached
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert route.replica is a and route.reason is RouteReason.LOAD and route.cached_tokens == 0


def test_a_replica_over_the_imbalance_bound_is_never_given_the_request():
    a, b = replicas()
    holding(b, SYSTEM * 8)  # a prefix worth far more than its load
    long = SYSTEM * 8 + [1]
    b.outstanding = 4
    a.outstanding = 1  # bound: 2 x 1 + 2 = 4
    assert router().choose([a, b], "llm", prompt(long), NOW).replica is b
    b.outstanding = 5
    route = router().choose([a, b], "llm", prompt(long), NOW)
    assert route.replica is a and route.reason is RouteReason.LOAD


def test_below_the_prefix_threshold_the_least_loaded_replica_is_chosen():
    a, b = replicas()
    holding(b, SYSTEM[:3 * BLOCK])  # 48 tokens < 64
    b.outstanding = 1
    route = router().choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.replica is a and route.reason is RouteReason.CACHE_MISS


def test_ties_go_to_the_users_replica_or_else_in_turn():
    a, b = replicas()
    r = router()
    by_user = {r.choose([a, b], "llm", prompt([7] * 10, user=f"user{i}"), NOW).replica.url for i in range(20)}
    assert by_user == {"r0:1", "r1:1"}  # users spread over both
    for user in ("alice", "bob"):
        first = r.choose([a, b], "llm", prompt([5] * 10, user), NOW).replica
        assert all(r.choose([a, b], "llm", prompt([5] * 10, user), NOW).replica is first for _ in range(5))
    turns = [r.choose([a, b], "llm", prompt([9] * 10), NOW).replica for _ in range(4)]
    assert turns[0] is not turns[1] and turns[0] is turns[2]


def test_a_prompt_just_sent_counts_as_cached_there_until_its_time_runs_out():
    a, b = replicas()
    r = router(pending_seconds=60.0)
    first = r.choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert first.reason is RouteReason.CACHE_MISS
    follower = r.choose([a, b], "llm", prompt(SYSTEM + [2]), NOW + 1)
    assert follower.replica is first.replica and follower.reason is RouteReason.CACHE_HIT
    later = r.choose([a, b], "llm", prompt(SYSTEM + [3]), NOW + 120)
    assert later.reason is RouteReason.CACHE_MISS


def test_a_restarted_engine_forgets_what_it_held_and_what_was_sent_to_it():
    a, b = replicas()
    holding(b, SYSTEM)
    r = router()
    r.choose([a, b], "llm", prompt(SYSTEM * 2), NOW)  # sent to b: pending there too
    report(b, [], epoch="after-restart")
    assert b.prefix_index("llm").held.hashes == set() and not b.prefix_index("llm").pending
    route = r.choose([a, b], "llm", prompt(SYSTEM + [4]), NOW)
    assert route.reason is RouteReason.CACHE_MISS


def test_evicted_blocks_no_longer_attract_requests():
    a, b = replicas()
    holding(b, SYSTEM)
    hashes = block_hashes(SYSTEM, BLOCK)
    report(b, [], evicted=hashes[10:], reset=False)  # 10 blocks = 160 tokens left
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert route.replica is b and route.cached_tokens == 10 * BLOCK
    report(b, [], evicted=hashes, reset=False)
    assert router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW).reason is RouteReason.CACHE_MISS


def test_a_replica_without_reports_is_routed_by_load_and_unmatchable_prompts_too():
    a, b = replicas()
    holding(b, SYSTEM)
    a.prefix_index("llm").reporting = False
    assert router().choose([a, b], "llm", prompt(SYSTEM), NOW).replica is b  # b still reports
    b.prefix_index("llm").reporting = False
    route = router().choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.reason is RouteReason.NO_INDEX
    a.prefix_index("llm").reporting = True
    assert router().choose([a, b], "llm", Prompt(None), NOW).reason is RouteReason.NO_INDEX


def test_least_outstanding_policy_ignores_the_cache():
    a, b = replicas()
    holding(b, SYSTEM)
    b.outstanding = 1
    route = router(policy="least-outstanding").choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.replica is a and route.reason is RouteReason.LEAST_OUTSTANDING
