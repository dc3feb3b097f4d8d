"""Which replica runs a request: the one whose engine already holds the head of its prompt in its prefix cache,
weighed against how loaded each replica is (cache-aware routing), or simply the least loaded one.

The gateway keeps, per replica and model, a copy of the prefix blocks its engine holds (`PrefixIndex`): every
`poll_interval` it asks the replica's llm model what changed (its `cache_state` input, kv_events.py), which also
reports the engine's queues. A prompt is tokenized here as the replica will (the model's tokenizer and chat
template, `--tokenizer MODEL=PATH`) and cut into the same block hashes (kv_events.block_hashes). A prompt just
sent to a replica counts as cached there until its engine reports the blocks (or `pending_seconds` pass), so a
burst of requests sharing a new system prompt follows the first one instead of computing it everywhere.

The choice, among the healthy replicas that serve the model:
1. A replica with more than `imbalance_ratio` x the least loaded one's outstanding requests, plus
   `imbalance_slack`, is not a candidate: prefix hits never pile requests onto one replica. Nor is one whose
   engine reports its KV cache `kv_full` while another's has room (a new request there would wait or preempt).
2. If no candidate holds `min_prefix_tokens` of the prompt, or the prompt cannot be hashed (no tokenizer for the
   model, a LoRA adapter's request, a replica that does not report blocks), the least loaded one is chosen.
3. Otherwise the one with the lowest cost: the prompt tokens it would have to compute, plus `load_cost_tokens`
   for each request in flight there.
Ties go to the replica the request's `user` (or `x-session-id` header) hashes to, else in turn. The reason is
the request's log line's `routing` and the `pagedllm_gateway_routes` metric's label."""
from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.gateway.config import RoutingConfig
from pagedllm.kv_events import CacheState, HeldBlocks, block_hashes
from pagedllm_client import ClientError
from pagedllm_client.errors import InvalidRequest

if TYPE_CHECKING:
    from pagedllm.gateway.replicas import Replica

logger = logging.getLogger("pagedllm.gateway")
RETRY_REPORTING_SECONDS = 30.0  # a replica that did not answer cache_state is asked again after this long


class RoutingReason(enum.StrEnum):
    CACHE_HIT = "cache_hit"  # the chosen replica holds at least min_prefix_tokens of the prompt
    CACHE_MISS = "cache_miss"  # no candidate held that much: the least loaded one
    LOAD = "load"  # a replica held the prefix, but its load sent the request elsewhere
    NO_INDEX = "no_index"  # the prompt could not be matched (no tokenizer, an adapter, no replica reporting)
    LEAST_OUTSTANDING = "least_outstanding"  # routing policy least-outstanding


@dataclass(frozen=True)
class RoutingDecision:
    replica: Replica
    reason: RoutingReason
    cached_tokens: int = 0  # of the prompt, held on the chosen replica (or sent there just before)

    def log(self) -> dict[str, Any]:
        return {"reason": self.reason.value, "cached_tokens": self.cached_tokens}


@dataclass
class PrefixIndex:
    """One replica's prefix blocks for one model: what its engine reported, and what was sent there since."""
    held: HeldBlocks = field(default_factory=HeldBlocks)
    pending: dict[int, float] = field(default_factory=dict)  # block hash -> when it stops counting
    reporting: bool = False  # answers cache_state: without it, the replica is routed by load alone
    asked_at: float = float("-inf")

    def update(self, state: CacheState) -> None:
        if self.held.apply(state):
            self.pending.clear()  # a new engine: nothing sent to the old one is there
        for h in state.evicted:
            self.pending.pop(h, None)
        self.reporting = True

    def matched(self, hashes: Sequence[int], now: float) -> int:
        """How many of the prompt's leading blocks it holds, or was sent within pending_seconds."""
        for count, h in enumerate(hashes):
            if h not in self.held.hashes and self.pending.get(h, 0.0) <= now:
                return count
        return len(hashes)

    def sent(self, hashes: Sequence[int], until: float, now: float) -> None:
        if len(self.pending) > 4 * len(hashes) + 65536:  # expired entries go before the map grows without bound
            self.pending = {h: t for h, t in self.pending.items() if t > now}
        self.pending.update(dict.fromkeys(hashes, until))


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the replica will see it: its token ids, once tokenized, and the affinity key."""
    token_ids: list[int] | None  # None: not tokenized (no tokenizer for the model, an adapter, a template error)
    affinity: str | None = None

    def hashes(self, block_size: int) -> list[int]:
        return block_hashes(self.token_ids, block_size) if self.token_ids and block_size else []


class Tokenizers:
    """Each model's tokenizer for routing, loaded on first use (transformers is needed: a gateway-only install
    routes by load)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths, self._loaded = paths, {}

    def get(self, model: str) -> Any | None:
        if model not in self.paths:
            return None
        if model not in self._loaded:
            try:
                from pagedllm.engine.tokenizer import load_tokenizer
                self._loaded[model] = load_tokenizer(self.paths[model])
            except Exception as e:  # noqa: BLE001 (no transformers, a bad folder: routed by load, said once)
                logger.warning("--tokenizer %s=%s cannot be loaded (%s); %s is routed by load alone", model,
                               self.paths[model], e, model)
                self._loaded[model] = None
        return self._loaded[model]

    def prompt_ids(self, model: str, prompt: str | None, messages: list[dict[str, Any]] | None,
                   tool_use: Any = None) -> list[int] | None:
        """The token ids the replica's llm model will compute for this prompt (serving/tokenization.py's rule),
        or None where they cannot be known here."""
        tokenizer = self.get(model)
        if tokenizer is None:
            return None
        from pagedllm.engine.tokenizer import encode_chat, encode_text
        try:
            return encode_chat(tokenizer, messages, tool_use)[1] if messages is not None \
                else encode_text(tokenizer, prompt or "")
        except Exception:  # noqa: BLE001 (the replica refuses it with the reason; routing does not need to)
            return None


class Router:
    """The choice of replica, and the polling that keeps each replica's PrefixIndex current."""

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.tokenizers = Tokenizers(config.tokenizers)
        self.cache_aware = config.policy == "cache-aware"
        self._turn = 0

    async def load_tokenizers(self) -> None:
        """At start: loading one takes seconds (transformers' import), which no request should wait for."""
        if self.cache_aware:
            for model in self.config.tokenizers:
                await asyncio.to_thread(self.tokenizers.get, model)

    async def prompt(self, model: str, prompt: str | None, messages: list[dict[str, Any]] | None,
                     tool_use: Any = None, lora_name: str | None = None, affinity: str | None = None) -> Prompt:
        """The prompt's token ids, tokenized off the event loop (a long chat takes milliseconds)."""
        if not self.cache_aware or lora_name is not None or model not in self.config.tokenizers:
            return Prompt(None, affinity)
        ids = await asyncio.to_thread(self.tokenizers.prompt_ids, model, prompt, messages, tool_use)
        return Prompt(ids, affinity)

    def choose(self, candidates: list[Replica], model: str, prompt: Prompt,
               now: float | None = None) -> RoutingDecision:
        now = time.monotonic() if now is None else now
        fewest = min(r.outstanding for r in candidates)
        if not self.cache_aware:
            return RoutingDecision(self._tie(candidates, fewest, prompt), RoutingReason.LEAST_OUTSTANDING)
        bound = self.config.imbalance_ratio * fewest + self.config.imbalance_slack
        indexes = [r.prefix_index(model) for r in candidates]
        block_size = next((i.held.block_size for i in indexes if i.reporting), 0)
        hashes = prompt.hashes(block_size)
        if not hashes:
            return RoutingDecision(self._tie(candidates, fewest, prompt), RoutingReason.NO_INDEX)
        matched = {id(r): i.matched(hashes, now) * block_size if i.reporting and i.held.block_size == block_size
                   else 0 for r, i in zip(candidates, indexes)}
        within = [(r, i) for r, i in zip(candidates, indexes) if r.outstanding <= bound]
        eligible = [r for r, i in within if i.held.load.kv_cache_usage < self.config.kv_full] or [r for r, _ in within]
        best_anywhere = max(matched.values())
        if best_anywhere < self.config.min_prefix_tokens:
            route = RoutingDecision(self._tie(candidates, fewest, prompt), RoutingReason.CACHE_MISS)
        else:
            prompt_tokens = len(hashes) * block_size
            costs = {id(r): prompt_tokens - matched[id(r)] + self.config.load_cost_tokens * r.outstanding
                     for r in eligible}
            lowest = min(costs.values())
            chosen = self._pick_tied([r for r in eligible if costs[id(r)] == lowest], prompt)
            hit = matched[id(chosen)] >= self.config.min_prefix_tokens
            route = RoutingDecision(chosen, RoutingReason.CACHE_HIT if hit else RoutingReason.LOAD, matched[id(chosen)])
        route.replica.prefix_index(model).sent(hashes, now + self.config.pending_seconds, now)
        return route

    def _tie(self, candidates: list[Replica], fewest: int, prompt: Prompt) -> Replica:
        return self._pick_tied([r for r in candidates if r.outstanding == fewest], prompt)

    def _pick_tied(self, tied: list[Replica], prompt: Prompt) -> Replica:
        if prompt.affinity is not None and len(tied) > 1:
            digest = hashlib.blake2b(prompt.affinity.encode(), digest_size=8).digest()
            return sorted(tied, key=lambda r: r.url)[int.from_bytes(digest, "little") % len(tied)]
        self._turn += 1
        return tied[self._turn % len(tied)]

    # ---- keeping each replica's index current ----------------------------------------------------------------
    async def poll(self, replicas: list[Replica], models: list[str]) -> None:
        """Ask every healthy replica what changed in each model's prefix cache (and its load)."""
        now = time.monotonic()
        await asyncio.gather(*(self._poll_one(r, m, now) for r in replicas for m in models
                               if r.healthy and m in r.models))

    async def _poll_one(self, replica: Replica, model: str, now: float) -> None:
        index = replica.prefix_index(model)
        first = index.asked_at == float("-inf")
        if not index.reporting and not first and now - index.asked_at < RETRY_REPORTING_SECONDS:
            return
        index.asked_at = now
        try:
            text = await replica.client(model).cache_state(**index.held.query())
            index.update(CacheState.from_json(text))
        except (InvalidRequest, ValueError) as e:  # a model without cache_state (another version's, not ours)
            if index.reporting or first:
                logger.warning("replica %s: %s does not report its prefix cache (%s); routed by load alone",
                               replica.url, model, e)
            index.reporting = False
        except ClientError as e:  # unreachable or busy for a moment: the health checks judge the replica
            logger.debug("replica %s: cache_state of %s failed: %s", replica.url, model, e)
