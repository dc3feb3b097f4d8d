"""routing.py's choice of replica on fake replicas and a fake clock: prefix hits against load, the imbalance bound,
ties, a restarted engine, evictions, a replica that does not report its blocks, and the pending prompts that let
a burst follow its first request."""
from __future__ import annotations

from pagedllm.gateway.config import RoutingConfig
from pagedllm.gateway.replicas import Replica
from pagedllm.gateway.routing import Prompt, Router, RoutingReason
from pagedllm.kv_events import CacheState, ReplicaLoad, block_hashes

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
    assert route.replica is b and route.reason is RoutingReason.CACHE_HIT and route.cached_tokens == len(SYSTEM)


def test_load_outweighs_a_prefix_worth_less_than_the_requests_in_flight():
    a, b = replicas()
    holding(b, SYSTEM)
    a.outstanding, b.outstanding = 1, 4  # b: 4 x 256 tokens of load, a: 1 x 256 and 640 to compute
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert route.replica is a and route.reason is RoutingReason.LOAD and route.cached_tokens == 0


def test_a_replica_over_the_imbalance_bound_is_never_given_the_request():
    a, b = replicas()
    holding(b, SYSTEM * 8)  # a prefix worth far more than its load
    long = SYSTEM * 8 + [1]
    b.outstanding = 6
    a.outstanding = 1  # bound: 2 x 1 + 4 = 6
    assert router().choose([a, b], "llm", prompt(long), NOW).replica is b
    b.outstanding = 7
    route = router().choose([a, b], "llm", prompt(long), NOW)
    assert route.replica is a and route.reason is RoutingReason.LOAD


def test_below_the_prefix_threshold_the_least_loaded_replica_is_chosen():
    a, b = replicas()
    holding(b, SYSTEM[:3 * BLOCK])  # 48 tokens < 64
    b.outstanding = 1
    route = router().choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.replica is a and route.reason is RoutingReason.CACHE_MISS


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
    assert first.reason is RoutingReason.CACHE_MISS
    follower = r.choose([a, b], "llm", prompt(SYSTEM + [2]), NOW + 1)
    assert follower.replica is first.replica and follower.reason is RoutingReason.CACHE_HIT
    later = r.choose([a, b], "llm", prompt(SYSTEM + [3]), NOW + 120)
    assert later.reason is RoutingReason.CACHE_MISS


def test_a_restarted_engine_forgets_what_it_held_and_what_was_sent_to_it():
    a, b = replicas()
    holding(b, SYSTEM)
    r = router()
    r.choose([a, b], "llm", prompt(SYSTEM * 2), NOW)  # sent to b: pending there too
    report(b, [], epoch="after-restart")
    assert b.prefix_index("llm").held.hashes == set() and not b.prefix_index("llm").pending
    route = r.choose([a, b], "llm", prompt(SYSTEM + [4]), NOW)
    assert route.reason is RoutingReason.CACHE_MISS


def test_evicted_blocks_no_longer_attract_requests():
    a, b = replicas()
    holding(b, SYSTEM)
    hashes = block_hashes(SYSTEM, BLOCK)
    report(b, [], evicted=hashes[10:], reset=False)  # 10 blocks = 160 tokens left
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert route.replica is b and route.cached_tokens == 10 * BLOCK
    report(b, [], evicted=hashes, reset=False)
    assert router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW).reason is RoutingReason.CACHE_MISS


def test_a_replica_without_reports_is_routed_by_load_and_unmatchable_prompts_too():
    a, b = replicas()
    holding(b, SYSTEM)
    a.prefix_index("llm").reporting = False
    assert router().choose([a, b], "llm", prompt(SYSTEM), NOW).replica is b  # b still reports
    b.prefix_index("llm").reporting = False
    route = router().choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.reason is RoutingReason.NO_INDEX
    a.prefix_index("llm").reporting = True
    assert router().choose([a, b], "llm", Prompt(None), NOW).reason is RoutingReason.NO_INDEX


def test_least_outstanding_policy_ignores_the_cache():
    a, b = replicas()
    holding(b, SYSTEM)
    b.outstanding = 1
    route = router(policy="least-outstanding").choose([a, b], "llm", prompt(SYSTEM), NOW)
    assert route.replica is a and route.reason is RoutingReason.LEAST_OUTSTANDING


def test_the_gateway_tokenizes_a_prompt_as_the_replica_will(tiny_model_dir):
    """A chat with tools, through the gateway's plan and the client's fields, and the stub's own parsing and
    tokenizing: the same ids, so the same block hashes. Text prompts too, and adapters are not matched."""
    import asyncio

    import numpy as np

    from pagedllm.engine.tokenizer import load_tokenizer
    from pagedllm.gateway.protocol import parse
    from pagedllm.serving.request import parse_request
    from pagedllm.serving.tokenization import tokenize_request
    from pagedllm_client.protocol import request_fields

    path = tiny_model_dir("llama-tied")
    r = Router(RoutingConfig(tokenizers={"llm": str(path)}))
    body = {"model": "llm", "messages": [{"role": "system", "content": "You help with the weather. " * 20},
                                         {"role": "user", "content": "Rain in Oslo? <|im_end|> tell me"}],
            "tools": [{"type": "function", "function": {"name": "forecast", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}]}
    plan = parse("chat", body)
    tool_use = plan.tool_call.tool_use()
    choice = plan.choices[0]
    gateway = asyncio.run(r.prompt("llm", choice.prompt, choice.messages, tool_use))
    fields = request_fields(None, choice.messages, {**tool_use.request_fields(), "max_tokens": 4})
    inputs = {k: np.array([v] if isinstance(v, bool) else [v.encode()], dtype=None if isinstance(v, bool) else object)
              for k, v in fields.items()}
    replica = tokenize_request(load_tokenizer(path), parse_request(inputs))
    assert gateway.token_ids == replica and len(replica) > 100
    text = asyncio.run(r.prompt("llm", "Once upon a time", None))
    assert text.token_ids == load_tokenizer(path).encode("Once upon a time")
    assert asyncio.run(r.prompt("llm", "x", None, lora_name="sql")).token_ids is None
    assert asyncio.run(r.prompt("other", "x", None)).token_ids is None


def test_a_replica_whose_kv_cache_is_full_gets_no_request_for_its_prefix_while_another_has_room():
    a, b = replicas()
    holding(b, SYSTEM)
    index = b.prefix_index("llm")
    index.update(CacheState("e", index.held.seq + 1, BLOCK, False, [], [], ReplicaLoad(kv_cache_usage=0.97)))
    route = router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW)
    assert route.replica is a and route.reason is RoutingReason.LOAD
    full = ReplicaLoad(kv_cache_usage=0.99)
    a.prefix_index("llm").update(CacheState("e", 9, BLOCK, False, [], [], full))
    assert router().choose([a, b], "llm", prompt(SYSTEM + [1]), NOW).replica is b  # both full: the prefix decides
