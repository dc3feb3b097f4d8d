"""Speculative decoding by n-gram prompt lookup: the tokens that followed the latest earlier occurrence of
the sequence's last n tokens (in its prompt or its output) are proposed as drafts, and one step computes
the sequence's next token and every draft at once.

Verification samples every row as if it were the only one (greedy: the argmax; otherwise the request's own
sampling), and keeps the samples up to and including the first that differs from its draft. For a draft
without probabilities (a point mass) that is rejection sampling: the draft is kept with the target's
probability of it, and a rejected one is replaced by a sample from the target without it; when every draft
is kept, the last row's sample is the bonus token. Each kept token is drawn from the target distribution
given the tokens before it, so the output's distribution is the one without speculation."""
from __future__ import annotations

import numpy as np

from pagedllm.engine.config import SpeculativeConfig
from pagedllm.engine.sampler import has_penalty
from pagedllm.engine.sequence import Sequence


def propose_ngram(token_ids: list[int], config: SpeculativeConfig, max_drafts: int) -> list[int]:
    """The tokens after the latest earlier occurrence of the longest suffix n-gram (prompt_lookup_max down
    to prompt_lookup_min tokens), at most `max_drafts` of them; none when no suffix recurs."""
    limit = min(config.num_speculative_tokens, max_drafts)
    if limit <= 0 or len(token_ids) <= config.prompt_lookup_min:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(config.prompt_lookup_max, len(tokens) - 1), config.prompt_lookup_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)  # every earlier n-gram
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + limit].tolist()
    return []


class NgramSpeculator:
    """Proposes each step's drafts and counts what verification kept (vLLM's spec_decode counters)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config, self.max_model_len = config, max_model_len
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def propose(self, running: list[Sequence]) -> None:
        """Set `draft_token_ids` of each running sequence that is about to decode one token."""
        for seq in running:
            seq.draft_token_ids = []
        size = self.config.disable_by_batch_size
        if size is not None and len(running) > size:
            return
        for seq in running:
            if seq.num_uncomputed_tokens == 1 and speculates(seq):
                # room for the drafts and the token after them, within max_tokens and max_model_len
                room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq.token_ids))
                seq.draft_token_ids = propose_ngram(seq.token_ids, self.config, room - 1)

    def verify(self, drafts: list[int], sampled: list[int]) -> list[int]:
        """The tokens to emit: `sampled` (one per row: after the last token, then after each draft) up to
        and including the first that differs from its draft."""
        kept = 0
        while kept < len(drafts) and sampled[kept] == drafts[kept]:
            kept += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += kept
        return sampled[:kept + 1]


def speculates(seq: Sequence) -> bool:
    """Penalties and min_tokens read the output so far, which differs row by row within a verification:
    such a sequence decodes one token at a time."""
    return not has_penalty(seq) and seq.num_output_tokens >= seq.params.min_tokens
