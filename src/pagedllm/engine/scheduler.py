"""Iteration-level scheduling: every step, running requests first (decodes and prefill chunks), then
waiting ones, within a token budget; the newest running requests are preempted (recomputed later)
when KV blocks run out. A request with a LoRA adapter starts only once its adapter holds a slot (lora.py), which
it keeps while it runs."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.lora import LoRABank
from pagedllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    num_preempted: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lora: LoRABank | None = None) -> None:
        self.block_manager, self.lora = block_manager, lora
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.waiting)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._release_adapter(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free_sequence(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if self.waiting and out.num_preempted == 0:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if seq.draft_token_ids and (n < seq.num_uncomputed_tokens or not self.block_manager.can_allocate(seq, n)):
                seq.draft_token_ids = []  # drafts go whole or not at all, and never cost another's blocks
                n = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, n):  # the newest give their blocks back, this one last
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    return budget
            out.scheduled.append((seq, n))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n) or (seq.lora_name and not self.lora.acquire(seq.lora_name)):
                self.block_manager.free_sequence(seq)
                break
            self.block_manager.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.draft_token_ids = []
        self.block_manager.free_sequence(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.num_preempted += 1

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_name:
            self.lora.release(seq.lora_name)
