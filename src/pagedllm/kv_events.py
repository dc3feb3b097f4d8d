"""Which prefix blocks an engine holds, as the engine, its serving side and the gateway all see it.

A full KV block is named by one hash: blake2b over its parent block's hash and its token ids, chained from a
root (ROOT for the base model; each LoRA adapter registration has its own, lora.py). The engine's prefix cache
(block_manager.py) keys its blocks by it and the gateway computes it for an incoming prompt to find the
replica that holds the prompt's head (gateway/routing.py), so it is the one function both call, stable across
processes, machines and Python versions (Python's own hash() is salted per process for text).

After each step the engine reports the hashes that became findable and those evicted (`BlockEvents`, the
net change of the step). The serving side keeps them in a `BlockLog` under an epoch that is new at every
engine start: a reader polling with the (epoch, seq) it last saw gets only what changed since, or the whole
set (`reset`) when the engine restarted or the reader fell too far behind. `HeldBlocks` is a reader's copy.
"""
from __future__ import annotations

import hashlib
import json
import sys
import threading
import uuid
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

ROOT = 0  # the base model's chain starts here
MAX_STATE_BYTES = 1 << 10  # a cache_state query is {"epoch": ..., "since": ...}


def chain_hash(parent: int, token_ids: Sequence[int]) -> int:
    """The hash of a block of `token_ids` following the block hashed `parent` (ROOT for a prompt's first)."""
    tokens = array("i", token_ids)
    if sys.byteorder == "big":
        tokens.byteswap()
    digest = hashlib.blake2b(parent.to_bytes(8, "little") + tokens.tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int, root: int = ROOT) -> list[int]:
    """The hash of every full block of a prompt, first to last."""
    hashes, parent = [], root
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


@dataclass(frozen=True, slots=True)
class BlockEvents:
    """A step's net change to the blocks the prefix cache can find: a hash is in one list at most."""
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()

    @classmethod
    def of(cls, changes: dict[int, bool]) -> BlockEvents:
        """From hash -> held afterwards (the last change of each hash wins)."""
        return cls(tuple(h for h, held in changes.items() if held), tuple(h for h, held in changes.items() if not held))


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """The engine's queues, cache and LoRA adapters after its last step, sent with each cache state."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    max_loras: int = 0  # adapter slots (0: LoRA off)
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    kv_cache_dtype: str = "auto"  # "int8" or the model's dtype; "auto" (vLLM's word: the model's) from older replicas


@dataclass(frozen=True)
class CacheState:
    """The answer to a cache_state query: what changed since the reader's seq in this epoch, or everything."""
    epoch: str
    seq: int
    block_size: int
    reset: bool  # `stored` is the whole set: forget what was held before
    stored: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)
    load: ReplicaLoad = ReplicaLoad()

    def to_json(self) -> str:
        data = asdict(self)
        data["stored"], data["evicted"] = [f"{h:016x}" for h in self.stored], [f"{h:016x}" for h in self.evicted]
        return json.dumps(data, separators=(",", ":"))  # hashes as hex: exact in every JSON reader

    @classmethod
    def from_json(cls, text: str) -> CacheState:
        """ValueError if `text` is not one (a replica of another version)."""
        try:
            data = json.loads(text)
            return cls(str(data["epoch"]), int(data["seq"]), int(data["block_size"]), bool(data["reset"]),
                       [int(h, 16) for h in data["stored"]], [int(h, 16) for h in data["evicted"]],
                       _load(data["load"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"not a cache state: {e}") from None


def _load(data: dict[str, Any]) -> ReplicaLoad:
    load = ReplicaLoad(**data)
    return replace(load, running_adapters=tuple(load.running_adapters), waiting_adapters=tuple(load.waiting_adapters))


def parse_query(text: str) -> tuple[str | None, int]:
    """A cache_state query's (epoch, since); ValueError saying what is wrong."""
    if len(text) > MAX_STATE_BYTES:
        raise ValueError(f"is longer than {MAX_STATE_BYTES} bytes")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(data, dict) or set(data) - {"epoch", "since"}:
        raise ValueError('expected {"epoch": "<the epoch last answered>" or null, "since": <its seq>}')
    epoch, since = data.get("epoch"), data.get("since", 0)
    if not (epoch is None or isinstance(epoch, str)) or not isinstance(since, int) or since < 0:
        raise ValueError("epoch must be a string or null, since an integer >= 0")
    return epoch, since


class BlockLog:
    """The serving side's record of one engine's blocks (one per engine start): the set held, and the last
    `keep_steps` steps' changes for readers that poll. Thread-safe: the pipe's reader records, queries read."""

    def __init__(self, block_size: int, keep_steps: int = 4096) -> None:
        self.block_size, self.epoch, self.seq = block_size, uuid.uuid4().hex[:16], 0
        self.held: set[int] = set()
        self._recent: deque[tuple[int, BlockEvents]] = deque(maxlen=keep_steps)
        self._lock = threading.Lock()

    def record(self, events: BlockEvents) -> None:
        with self._lock:
            self.seq += 1
            self.held.difference_update(events.evicted)
            self.held.update(events.stored)
            self._recent.append((self.seq, events))

    def answer(self, epoch: str | None, since: int, load: ReplicaLoad = ReplicaLoad()) -> CacheState:
        with self._lock:
            oldest = self._recent[0][0] if self._recent else self.seq + 1
            if epoch != self.epoch or since > self.seq or since < oldest - 1:
                return CacheState(self.epoch, self.seq, self.block_size, True, sorted(self.held), [], load)
            changes: dict[int, bool] = {}
            for seq, events in self._recent:
                if seq > since:
                    changes.update(dict.fromkeys(events.stored, True))
                    changes.update(dict.fromkeys(events.evicted, False))
            net = BlockEvents.of(changes)
            return CacheState(self.epoch, self.seq, self.block_size, False, list(net.stored), list(net.evicted), load)


class HeldBlocks:
    """A reader's copy of one engine's blocks, kept current by applying each CacheState it is answered."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.seq, self.block_size = 0, 0
        self.hashes: set[int] = set()
        self.load = ReplicaLoad()

    def apply(self, state: CacheState) -> bool:
        """Take in an answer; True if the engine restarted (or was new) since the last one."""
        restarted = state.epoch != self.epoch
        if state.reset:
            self.hashes = set(state.stored)
        else:
            self.hashes.difference_update(state.evicted)
            self.hashes.update(state.stored)
        self.epoch, self.seq, self.block_size, self.load = state.epoch, state.seq, state.block_size, state.load
        return restarted

    def query(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "since": self.seq}
