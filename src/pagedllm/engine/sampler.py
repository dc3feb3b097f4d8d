"""Turns the logits of the sampling rows into tokens: penalties, greedy or temperature sampling with
top-k / top-p / min-p, per-request seeds, and top-N logprobs of the raw model distribution.

Nothing sorts the vocabulary: each sampled row draws one uniform number and inverts its distribution's
cumulative sum. A row with top-k, top-p or min-p looks at its 64 most likely tokens (one `topk` for the batch),
which hold every token those filters keep unless the distribution is flat; a row whose kept set may run
further is detected and looks at 1,024, then at the whole vocabulary. The kept set is always exactly the
sorted definition's, drawn in the same order however far the row looked.

Where the engine runs on the CPU kernels, a row's draw at temperature and its looks at 64 and 1,024 candidates are
theirs (kernels.h draw_token and draw_filtered, one row per thread; a row whose kept set runs further comes back
to the torch code here); the torch code is the path of the other backends and the definition the kernels are
tested against."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import Sequence, TokenLogprobs

# How far a filtered row looks, widening for the rows whose kept set runs further; the whole vocabulary last.
# Top-p 0.95 over SmolLM2's chat answers at temperature 0.8 keeps a few to a few dozen tokens, now and then
# hundreds.
WIDTHS = (64, 1024)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0, kernels: ModuleType | None = None) -> None:
        """`kernels`: the CPU kernels' module where the engine runs on them (kernels/cpu.py load), else None."""
        self.generator = torch.Generator().manual_seed(seed)
        self.kernels = kernels

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int],
                 argmax: list[int] | None = None) -> SamplerOutput:
        """`argmax`: each row's most likely token, where the kernels found it for a batch whose every row takes it
        (takes_argmax)."""
        raw_logprobs = logits.log_softmax(dim=-1) if any(s.params.logprobs is not None for s in seqs) else None
        if argmax is not None:
            return SamplerOutput(argmax, _token_logprobs(raw_logprobs, argmax, seqs))
        logits = apply_penalties(logits, seqs)
        _mask_stops_before_min_tokens(logits, seqs, eos_token_ids)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if len(sampled) == len(seqs):  # no copies of the logits where every row samples, nor an argmax
            token_ids = self._sample(logits, seqs)
        else:
            token_ids = greedy(logits)
            if sampled:
                rows = torch.tensor(sampled)
                token_ids[rows] = self._sample(logits[rows], [seqs[i] for i in sampled])
        token_ids = token_ids.tolist()
        return SamplerOutput(token_ids, _token_logprobs(raw_logprobs, token_ids, seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row, drawn from the row's temperature-scaled, filtered distribution."""
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)[:, None]
        uniform = self._uniforms(seqs)
        filtered = [_filters(s, logits.shape[-1]) for s in seqs]
        if not any(filtered):
            return _draw_unfiltered(logits, temps, uniform, self.kernels)
        if all(filtered):
            return _sample_filtered(logits, temps, seqs, uniform, self.kernels)
        out = torch.empty(len(seqs), dtype=torch.long)
        rows = torch.tensor(filtered)
        plain = (~rows).nonzero().flatten()
        out[plain] = _draw_unfiltered(logits[plain], temps[plain], uniform[plain], self.kernels)
        rows = rows.nonzero().flatten()
        out[rows] = _sample_filtered(logits[rows], temps[rows], [seqs[i] for i in rows.tolist()], uniform[rows],
                                     self.kernels)
        return out

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One number in [0, 1) per row: from the request's own generator where it set a seed (so its tokens
        do not depend on what it is batched with), else from the engine's."""
        uniform = torch.rand(len(seqs), generator=self.generator, dtype=torch.float64)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                uniform[i] = torch.rand(1, generator=seq.generator, dtype=torch.float64)
        return uniform


def takes_argmax(seq: Sequence) -> bool:
    """Its token is its logits' most likely as the model gives them: greedy, with no penalty, no grammar's mask and
    no stop token held back for min_tokens."""
    return (seq.params.greedy and not has_penalty(seq) and seq.grammar is None
            and seq.num_output_tokens >= seq.params.min_tokens)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token (the first of equals, as torch.argmax). On the CPU through numpy, whose argmax
    takes 5 us for a row of 49,152 and 0.10 ms for 32 rows where torch's takes 44 us and 0.69 ms (Zen 4)."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    return torch.from_numpy(logits.numpy().argmax(axis=-1))


def _filters(seq: Sequence, vocab: int) -> bool:
    return _top_k(seq.params, vocab) > 0 or seq.params.top_p < 1.0 or seq.params.min_p > 0.0


def _top_k(params: SamplingParams, vocab: int) -> int:
    """The request's top-k, 0 where it keeps the whole vocabulary (vLLM's -1 and 0, or k >= vocab)."""
    return params.top_k if 0 < params.top_k < vocab else 0


def _draw_unfiltered(logits: torch.Tensor, temps: torch.Tensor, uniform: torch.Tensor,
                     kernels: ModuleType | None = None) -> torch.Tensor:
    """From the whole vocabulary: exp((logits - max) / T) is each row's distribution, unnormalized."""
    scale = 1 / temps  # one fused pass for (logits - max) / T: 1.2-1.4 ms at 32 x 49,152 against 2.5-3.5 ms
    if kernels is not None:
        return kernels.draw_tokens(logits.float().contiguous(), scale.flatten().float(), uniform.double())
    return _draw(torch.addcmul(-logits.amax(dim=-1, keepdim=True) * scale, logits, scale).exp_(), uniform)


def _draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, index i with probability weights[i] / sum(weights) (`weights` is overwritten): the first index
    whose cumulative sum passes uniform x total, which is never one of zero weight (the sum does not grow
    there), the total itself excluded."""
    cdf = weights.cumsum_(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform[:, None].to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).flatten()


def _sample_filtered(logits: torch.Tensor, temps: torch.Tensor, seqs: list[Sequence], uniform: torch.Tensor,
                     kernels: ModuleType | None = None) -> torch.Tensor:
    vocab = logits.shape[-1]
    limits = _Limits.of([s.params for s in seqs], vocab)
    rows, widths = torch.arange(len(seqs)), (*WIDTHS, vocab)
    if kernels is not None:  # the first two looks in C++: each row drawn there where its kept set is among them
        width = min(vocab, max(WIDTHS[0], int(limits.top_k.max())))
        out = kernels.draw_filtered_tokens(logits.float().contiguous(), (1 / temps).flatten().float(), limits.top_k,
                                           limits.top_p, limits.min_p, uniform.double(), width, min(vocab, WIDTHS[1]))
        rows, widths = (out < 0).nonzero().flatten(), widths[2:]
        if not len(rows):
            return out
    else:
        out = torch.empty(len(seqs), dtype=torch.long)
    norm = None
    for width in widths:  # the rows whose kept set runs past the candidates look further
        width = min(vocab, max(width, int(limits.top_k[rows].max())))
        values, ids = _take(logits, rows).topk(width, dim=-1)  # sorted; a temperature keeps the order
        values = values / _take(temps, rows)
        if norm is None:
            norm = _normalizers(_take(logits, rows), _take(temps, rows), values[:, :1], limits.pick(rows))
        probs, keep, covered = limits.pick(rows).keep(values, norm)
        if width == vocab or covered.all():  # the usual case: every row done at the first look
            out[rows] = ids.gather(1, _draw(probs * keep, uniform[rows])[:, None]).flatten()
            return out
        done = covered.nonzero().flatten()
        drawn = _draw(probs[done] * keep[done], uniform[rows[done]])
        out[rows[done]] = ids[done].gather(1, drawn[:, None]).flatten()
        rows, norm = rows[~covered], norm[~covered]
    return out


def _take(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return tensor if len(rows) == len(tensor) else tensor[rows]


def _normalizers(logits: torch.Tensor, temps: torch.Tensor, top: torch.Tensor, limits: _Limits) -> torch.Tensor:
    """What each row's probabilities are taken relative to. Top-p over the whole vocabulary needs the true
    log-normalizer, a pass over all of it; top-k renormalizes over its own tokens and min-p compares ratios,
    for which the most likely token's logit serves (and is the same however far a row looks)."""
    norm = top.clone()
    whole = limits.whole_vocabulary()
    if whole.any():
        rows = whole.nonzero().flatten()
        norm[rows] = _log_normalizer(_take(logits, rows), _take(temps, rows), top[rows])
    return norm


def _log_normalizer(logits: torch.Tensor, temps: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(logits / T))) per row, `top` being each row's largest logits / T."""
    return top + (logits - top * temps).div_(temps).exp_().sum(dim=-1, keepdim=True).log_()


@dataclass
class _Limits:
    """Per row: top-k (0: off), top-p and min-p."""
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int) -> _Limits:
        return cls(torch.tensor([_top_k(p, vocab) for p in params]),
                   torch.tensor([p.top_p for p in params], dtype=torch.float64),
                   torch.tensor([p.min_p for p in params], dtype=torch.float64))

    def whole_vocabulary(self) -> torch.Tensor:
        """The rows whose top-p is of the whole vocabulary's mass (no top-k): they need the true normalizer."""
        return (self.top_k == 0) & (self.top_p < 1.0)

    def pick(self, rows: torch.Tensor) -> _Limits:
        return _Limits(self.top_k[rows], self.top_p[rows], self.min_p[rows])

    def keep(self, values: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For each row's most likely tokens (`values`, sorted; `lse`: the row's logsumexp): their probabilities
        as top-p and min-p see them (renormalized over the top-k), which of them the three filters keep, and
        whether every token they keep is among these."""
        width = values.shape[-1]
        top_k = self.top_k[:, None]
        in_top_k = (top_k == 0) | (torch.arange(width)[None, :] < top_k)
        probs = (values - lse).exp().to(torch.float64) * in_top_k
        probs = torch.where(top_k > 0, probs / probs.sum(dim=-1, keepdim=True), probs)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        keep = in_top_k & ((self.top_p[:, None] >= 1.0) | (before < self.top_p[:, None]))
        keep &= probs >= self.min_p[:, None] * probs[:, :1]
        keep[:, 0] = True
        # The tokens past these are less likely still: top-k drops them all if it ends here, top-p if these
        # reach its mass, min-p if the last of these is already below its bar. (A top-k past them leaves its
        # mass, and so every probability above, unknown.)
        covered = (self.top_k <= width) & ((self.top_k > 0)
                                           | ((self.top_p < 1.0) & (before[:, -1] + probs[:, -1] >= self.top_p))
                                           | ((self.min_p > 0.0) & (probs[:, -1] < self.min_p * probs[:, 0])))
        return probs, keep, covered


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
