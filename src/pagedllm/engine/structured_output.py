"""Structured output: a request's constraint (StructuredOutputsParams) compiled by xgrammar into a grammar once
per distinct constraint (in the grammar worker's process, within a time budget; a bounded cache), a matcher
per sequence that follows its output, and each step a token mask for the constrained rows only, applied to
their logits before sampling, so that every sampling mode works under a constraint. The grammar allows EOS
only where the output may end.

With speculative decoding, drafts are cut at the first token the grammar refuses, each verification row is
masked for the state after the drafts before it, and the matcher rolls those drafts back until the kept tokens
are known."""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
import xgrammar as xgr

from pagedllm.engine.grammar_worker import GrammarWorker
from pagedllm.engine.sampling_params import StructuredOutputsParams
from pagedllm.engine.sequence import Sequence

CACHE_BYTES = 64 << 20  # compiled grammars kept; a JSON schema's is tens of KB


class StructuredOutputs:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int], compile_timeout: float) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, eos_token_ids
        self.worker = GrammarWorker(tokenizer, vocab_size, eos_token_ids, compile_timeout)
        weakref.finalize(self, self.worker.close)  # an engine that goes away takes its worker process along
        self._info: xgr.TokenizerInfo | None = None
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()

    @property
    def info(self) -> xgr.TokenizerInfo:
        """Built on the first constrained request (0.18 s of reading the vocabulary that an engine which
        never sees one does not spend at start); requests are validated on several threads."""
        with self._lock:
            if self._info is None:
                self._info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                                stop_token_ids=self.eos_token_ids)
            return self._info

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar (from the cache, or the grammar worker), or RequestRejectedError naming the
        field that does not compile in time."""
        key = (params.kind, params.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = xgr.CompiledGrammar.deserialize_json(self.worker.compile(*key), self.info)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = grammar
                self._cache_bytes += grammar.memory_size_bytes
                while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
                    self._cache_bytes -= self._cache.popitem(last=False)[1].memory_size_bytes
        return grammar

    def start(self, seq: Sequence) -> None:
        """Give a constrained sequence its matcher (the grammar is in the cache since validation)."""
        if seq.params.structured_outputs is not None:
            grammar = self.compile(seq.params.structured_outputs)
            seq.grammar = xgr.GrammarMatcher(grammar)

    def cut_drafts(self, seqs: list[Sequence]) -> None:
        """Cut each constrained sequence's drafts before the first token its grammar refuses."""
        for seq in seqs:
            if seq.grammar is None or not seq.draft_token_ids:
                continue
            valid = 0
            while valid < len(seq.draft_token_ids) and seq.grammar.accept_token(seq.draft_token_ids[valid]):
                valid += 1
            if valid:
                seq.grammar.rollback(valid)
            seq.draft_token_ids = seq.draft_token_ids[:valid]

    def mask(self, logits: torch.Tensor, seqs: list[Sequence], num_rows: list[int]) -> None:
        """Mask in place the rows of constrained sequences (`num_rows` per sequence: its token and drafts)."""
        if all(seq.grammar is None for seq in seqs):
            return
        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        rows, first = [], 0
        for seq, n in zip(seqs, num_rows):
            if seq.grammar is not None:
                rows += range(first, first + n)
                _fill(seq.grammar, bitmask, first, seq.draft_token_ids[:n - 1])
            first += n
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=rows)

    @staticmethod
    def advance(seq: Sequence, tokens: list[int]) -> bool:
        """Feed the tokens a step appended to a constrained sequence; True when its grammar is complete."""
        for token in tokens:
            if not seq.grammar.accept_token(token):
                raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")
        return seq.grammar.is_terminated()


def _fill(matcher: xgr.GrammarMatcher, bitmask: torch.Tensor, first: int, drafts: list[int]) -> None:
    """Rows first..first+len(drafts): the masks after 0, 1, ... of the drafts, then the drafts undone."""
    for i, token in enumerate(drafts):
        matcher.fill_next_token_bitmask(bitmask, first + i)
        matcher.accept_token(token)
    matcher.fill_next_token_bitmask(bitmask, first + len(drafts))
    if drafts:
        matcher.rollback(len(drafts))

