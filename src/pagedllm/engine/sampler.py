"""Turns the logits of the sampling rows into tokens: penalties, greedy or temperature sampling with
top-k / top-p / min-p, per-request seeds, and top-N logprobs of the raw model distribution."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.engine.sequence import Sequence, TokenLogprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        logits = apply_penalties(logits, seqs)
        _mask_stops_before_min_tokens(logits, seqs, eos_token_ids)
        if all(s.params.greedy for s in seqs):
            token_ids = logits.argmax(dim=-1).tolist()
        else:
            token_ids = self._sample(logits, seqs)
        return SamplerOutput(token_ids, _token_logprobs(raw_logprobs, token_ids, seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        temps = torch.tensor([s.params.temperature or 1.0 for s in seqs], dtype=logits.dtype)
        probs = filter_logits(logits / temps[:, None], seqs).softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, seq in enumerate(seqs):
            noise[row].exponential_(generator=seq.generator or self.generator)
        sampled = (probs / noise).argmax(dim=-1)  # the exponential race: an exact draw from `probs`
        greedy = torch.tensor([s.params.greedy for s in seqs])
        return torch.where(greedy, logits.argmax(dim=-1), sampled).tolist()


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if has_penalty(s)]
    if not rows:
        return logits
    logits = logits.clone()
    for i in rows:
        p, row = seqs[i].params, logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seqs[i].token_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.bincount(torch.tensor(seqs[i].output_token_ids, dtype=torch.long),
                                    minlength=row.shape[0])[:row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def has_penalty(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence], eos: list[int]) -> None:
    for i, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = seq.params.stop_token_ids + ([] if seq.params.ignore_eos else eos)
            if banned:
                logits[i, banned] = float("-inf")


def filter_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Set to -inf every token that top-k, top-p or min-p excludes (rows are already temperature-scaled)."""
    logits = logits.clone()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
            logits[i] = _filter_row(logits[i], p.top_k, p.top_p, p.min_p)
    return logits


def _filter_row(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    sorted_logits, order = row.sort(descending=True)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    if 0 < top_k < row.shape[0]:
        keep[top_k:] = False
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        keep &= before < top_p
    if min_p > 0.0:
        keep &= probs >= min_p * probs[0]
    keep[0] = True
    out = torch.full_like(row, float("-inf"))
    out[order[keep]] = sorted_logits[keep]
    return out


def _token_logprobs(logp: torch.Tensor | None, token_ids: list[int],
                    seqs: list[Sequence]) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = []
    for row, (seq, token) in enumerate(zip(seqs, token_ids)):
        n = seq.params.logprobs
        if logp is None or n is None:
            out.append(None)
            continue
        values, ids = logp[row].topk(n)
        out.append(TokenLogprobs(token, float(logp[row, token]), dict(zip(ids.tolist(), values.tolist()))))
    return out
