"""Sampling: exactly the allowed tokens survive top-k / top-p / min-p, looked for among the most likely tokens
or in the full sort alike; draws follow the filtered distribution; penalties; seeds."""
from __future__ import annotations

import math

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine.sampler import (
    WIDTHS,
    Sampler,
    _draw,
    _draw_unfiltered,
    _Limits,
    _sample_filtered,
    apply_penalties,
    greedy,
)
from tests.support.kernel_tiers import RUNNABLE, ops_for

LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02]))


def _filter_row(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """`row` with -inf for every token top-k, top-p and min-p exclude: the sorted definition, in full."""
    values, ids = row[None].sort(dim=-1, descending=True)
    limits = _Limits.of([SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)], row.shape[-1])
    _, keep, _ = limits.keep(values, row.logsumexp(dim=-1, keepdim=True)[None])
    out = torch.full_like(row, float("-inf"))
    out[ids[keep]] = values[keep]
    return out


def _kept(top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    row = _filter_row(LOGITS.clone(), top_k, top_p, min_p)
    return {i for i, v in enumerate(row.tolist()) if v != -math.inf}


@pytest.mark.parametrize("k, expected", [(1, {0}), (3, {0, 1, 2}), (7, set(range(7)))])
def test_top_k(k, expected):
    assert _kept(top_k=k) == expected


@pytest.mark.parametrize("p, expected", [(0.3, {0}), (0.39, {0}), (0.45, {0, 1}), (0.75, {0, 1, 2}),
                                         (0.85, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(p, expected):
    assert _kept(top_p=p) == expected


@pytest.mark.parametrize("m, expected", [(0.5, {0, 1}), (0.25, {0, 1, 2, 3}), (0.1, {0, 1, 2, 3, 4})])
def test_min_p(m, expected):
    assert _kept(min_p=m) == expected


def test_filters_compose():
    assert _kept(top_k=3, top_p=0.9, min_p=0.5) == {0, 1}


class _Seq:
    generator = None

    def __init__(self, tokens, n_prompt, params):
        self.token_ids, self.params = tokens, params
        self.output_token_ids = tokens[n_prompt:]
        self.num_output_tokens = len(self.output_token_ids)


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seq = _Seq([0, 1, 2, 2], 2, SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25))
    out = apply_penalties(logits, [seq])[0].tolist()
    assert out == [1.0, -4.0, 0.5 - 2 * 0.5 - 0.25, 0.5]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama-tied")), dtype="float32", block_size=4)


def test_seeded_sampling_is_independent_of_batch(tiny_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=1.2, max_tokens=20, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9]
    alone = tiny_llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    batch = tiny_llm.generate([[11, 12], prompt, [13] * 30], [other, seeded, other], use_tqdm=False)
    assert batch[1].token_ids == alone
    assert tiny_llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids == alone


def test_top_k_one_is_greedy(tiny_llm):
    greedy = tiny_llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                               use_tqdm=False)
    top1 = tiny_llm.generate([[3, 4, 5]], SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True),
                             use_tqdm=False)
    assert greedy[0].token_ids == top1[0].token_ids


def test_logprobs_are_top_n_of_model_distribution(tiny_llm):
    out = tiny_llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True),
                            use_tqdm=False)[0]
    assert len(out.logprobs) == 4
    for token, step in zip(out.token_ids, out.logprobs):
        top = step.top
        assert step.token_id == token and step.logprob == max(top.values())
        assert len(top) == 3 and max(top, key=top.get) == token and all(v <= 0 for v in top.values())


def test_logprobs_report_the_sampled_token_outside_the_top_n(tiny_llm):
    params = SamplingParams(temperature=5.0, seed=3, max_tokens=12, logprobs=1, ignore_eos=True)
    out = tiny_llm.generate([[3, 4, 5]], params, use_tqdm=False)[0]
    outside = [step for step in out.logprobs if step.token_id not in step.top]
    assert outside and all(step.logprob < min(step.top.values()) for step in outside)


def test_min_tokens_and_stop_token_ids(tiny_llm):
    first = tiny_llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    stop_at = first[0].token_ids[2]
    out = tiny_llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at],
                                                        ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    assert len(out.token_ids) == first[0].token_ids.index(stop_at) + 1


def test_min_tokens_on_the_engine_path(tiny_model_dir):
    """Found by the server fuzz test: masking stop tokens before min_tokens wrote into an inference tensor."""
    llm = LLM(str(tiny_model_dir("llama-tied")), dtype="float32", block_size=4)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, min_tokens=1), use_tqdm=False)[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


# ---- the sampler that never sorts: the same kept set and distribution as the sorted definition -----------
@pytest.mark.parametrize("params", [{"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 200, "top_p": 0.5},
                                    {"top_k": 30, "top_p": 0.8, "min_p": 0.1}])
@pytest.mark.parametrize("spread", [0.3, 3.0, 8.0])  # 0.3: flat, past the candidates; 8.0: peaked
def test_candidates_keep_exactly_what_the_full_sort_keeps(params, spread):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(int(spread * 10))) * spread
    limits = _Limits.of([SamplingParams(**params)] * 6, 500)
    lse = logits.logsumexp(dim=-1, keepdim=True)
    full_values, full_ids = logits.sort(dim=-1, descending=True)
    _, full_keep, _ = limits.keep(full_values, lse)
    values, ids = logits.topk(max(WIDTHS[0], params.get("top_k", 0)), dim=-1)  # the sampler's first width
    _, keep, covered = limits.keep(values, lse)
    for row in range(6):
        expected = set(full_ids[row][full_keep[row]].tolist())
        assert set(_filter_row(logits[row], params.get("top_k", 0), params.get("top_p", 1.0),
                               params.get("min_p", 0.0)).isfinite().nonzero().flatten().tolist()) == expected
        if covered[row]:  # else the kept set may run past the candidates, and the sampler sorts the row in full
            assert set(ids[row][keep[row]].tolist()) == expected
    if spread == 0.3 and params == {"top_p": 0.9}:
        assert not covered.any()  # flat: the full sort's path is the one taken
    if spread == 8.0:
        assert covered.all()


@pytest.fixture(params=["torch", *RUNNABLE], ids=str)
def kernels(request):
    """The sampler's passes over whole rows: torch's, or a tier of the CPU kernels'."""
    return None if request.param == "torch" else ops_for(request.param)


@pytest.mark.parametrize("params", [{"temperature": 0.7}, {"temperature": 1.0, "top_p": 0.8},
                                    {"temperature": 1.3, "top_k": 3, "min_p": 0.2},
                                    {"temperature": 1.0, "min_p": 0.001}])  # flat enough for the full sort
def test_draws_follow_the_filtered_distribution(params, kernels):
    logits = torch.log(torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.05, 0.03, 0.02])).repeat(2000, 1)
    seqs = [_Seq([], 0, SamplingParams(**params)) for _ in range(2000)]
    sampler = Sampler(seed=3, kernels=kernels)
    counts = torch.zeros(9)
    for _ in range(5):
        counts += torch.bincount(torch.tensor(sampler(logits, seqs, []).token_ids), minlength=9)
    p = params
    row = _filter_row(logits[0] / p["temperature"], p.get("top_k", 0), p.get("top_p", 1.0), p.get("min_p", 0.0))
    expected = row.softmax(dim=-1) * counts.sum()
    assert (counts[expected == 0] == 0).all()
    kept = expected > 0
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < 30.0, (counts, expected)  # 8 degrees of freedom at most: p < 0.001 of failing by chance


def test_rows_that_look_further_still_draw_only_kept_tokens(kernels):
    """A batch of peaked rows (done among the first candidates), middling ones (1,024) and flat ones (the
    whole vocabulary): every draw is a token its row keeps."""
    gen = torch.Generator().manual_seed(5)
    spreads = torch.tensor([12.0, 12.0, 2.5, 2.5, 0.2, 0.2]).repeat(20)
    logits = torch.randn(len(spreads), 3000, generator=gen) * spreads[:, None]
    params = SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01)
    tokens = Sampler(seed=1, kernels=kernels)(logits, [_Seq([], 0, params) for _ in spreads], []).token_ids
    for row, token in enumerate(tokens):
        assert _filter_row(logits[row], 0, 0.9, 0.01)[token].isfinite(), row


def test_greedy_takes_the_first_of_equal_maxima_as_torch_does():
    logits = torch.randn(5, 1000)
    logits[1, [3, 700]] = 50.0  # a tie
    logits[4] = 0.0  # all equal
    assert greedy(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert greedy(logits)[1] == 3 and greedy(logits)[4] == 0
    strided = logits[:, ::2]
    assert greedy(strided).tolist() == strided.argmax(dim=-1).tolist()


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_the_kernels_greedy_is_torchs_argmax(isa):
    """kernels.h argmax_rows, a stretch of each row per thread as forward_layers runs it: the first of equal maxima
    across stretches, a NaN above everything (as torch and numpy rank it), rows of -inf, rows shorter than a vector."""
    ops = ops_for(isa)
    logits = torch.randn(7, 1003)
    logits[1, [3, 700]] = 50.0  # a tie, in two threads' stretches
    logits[2] = 0.0  # all equal
    logits[3, 900], logits[3, 5] = float("nan"), 60.0
    logits[4] = float("-inf")
    logits[4, 1002] = -1e30  # the last token, past the whole vectors
    logits[5, [10, 20]] = float("inf")
    assert ops.greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist()
    short = torch.randn(3, 5)
    assert ops.greedy_tokens(short).tolist() == short.argmax(dim=-1).tolist()


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_the_kernels_argmax_is_taken_only_where_the_logits_stay_as_they_are(tiny_model_dir, isa):
    """Greedy rows on the kernels take the argmax found inside the step's call (sampler.takes_argmax); a batch
    with a penalty or a stop token held back for min_tokens samples from the logits as changed. Float32, against
    torch's path, token for token (a vocabulary of 64: the tokens repeat, and the penalty bites)."""
    ops_for(isa)
    model_dir = str(tiny_model_dir("llama3", 64))
    kernels = LLM(model_dir, dtype="float32", cpu_isa=isa.value, block_size=4)
    reference = LLM(model_dir, dtype="float32", attention_backend="torch", block_size=4)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    first = kernels.generate([[5, 6, 7]], plain, use_tqdm=False)[0].token_ids
    for params in [plain, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5),
                   SamplingParams(temperature=0, max_tokens=12, min_tokens=12, stop_token_ids=[first[0]])]:
        ours = [o.token_ids for o in kernels.generate([[5, 6, 7], [9, 10]], params, use_tqdm=False)]
        assert ours == [o.token_ids for o in reference.generate([[5, 6, 7], [9, 10]], params, use_tqdm=False)]
        if params.min_tokens:
            assert first[0] not in ours[0]


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_the_kernels_draw_as_the_cumulative_sum_does(isa):
    """The same uniform picks the same token as torch's cumsum and searchsorted, but where float32 sums in another
    order move a boundary; never a token of zero weight (the tail of -inf logits here)."""
    ops = ops_for(isa)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(400, 1003, generator=gen) * torch.tensor([0.5, 3.0, 9.0]).repeat(134)[:400, None]
    logits[:, 990:] = float("-inf")
    temps = torch.rand(400, 1, generator=gen) + 0.3
    uniform = torch.rand(400, generator=gen, dtype=torch.float64)
    uniform[:4] = torch.tensor([0.0, 0.5, 1 - 1e-12, 1 - 1e-16], dtype=torch.float64)
    ours, theirs = _draw_unfiltered(logits, temps, uniform, ops), _draw_unfiltered(logits, temps, uniform)
    assert (ours == theirs).float().mean() > 0.99
    assert (ours < 990).all()


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
@pytest.mark.parametrize("params", [{"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 200, "top_p": 0.5},
                                    {"top_k": 30, "top_p": 0.8, "min_p": 0.1}, {"top_p": 0.95, "min_p": 0.01}])
def test_the_kernels_filtered_draw_is_the_torch_one(isa, params):
    """The kernels' first look keeps what _Limits.keep keeps and draws what _draw draws with the same uniform,
    over peaked rows (done there) and flat ones (sent back, -1, to look further)."""
    ops = ops_for(isa)
    gen = torch.Generator().manual_seed(4)
    spreads = torch.tensor([12.0, 6.0, 3.0, 0.3]).repeat(50)
    logits = torch.randn(len(spreads), 5000, generator=gen) * spreads[:, None]
    temps = (torch.rand(len(spreads), 1, generator=gen) + 0.5)
    uniform = torch.rand(len(spreads), generator=gen, dtype=torch.float64)
    seqs = [_Seq([], 0, SamplingParams(temperature=float(t), **params)) for t in temps]
    limits = _Limits.of([s.params for s in seqs], 5000)
    width = max(WIDTHS[0], params.get("top_k", 0))
    first = ops.draw_filtered_tokens(logits, (1 / temps).flatten(), limits.top_k, limits.top_p, limits.min_p,
                                     uniform, width, 0)  # the first look only
    values, ids = logits.topk(width, dim=-1)
    values = values / temps
    whole = limits.whole_vocabulary()[:, None]
    norm = torch.where(whole, (logits / temps).logsumexp(dim=-1, keepdim=True), values[:, :1])
    probs, keep, covered = limits.keep(values, norm)
    assert torch.equal(first >= 0, covered)
    expected = ids.gather(1, _draw(probs * keep, uniform)[:, None]).flatten()
    assert (first[covered] == expected[covered]).float().mean() > 0.99
    both = ops.draw_filtered_tokens(logits, (1 / temps).flatten(), limits.top_k, limits.top_p, limits.min_p,
                                    uniform, width, 1024)  # and the second, for the rows the first sent back
    assert torch.equal(both[covered], first[covered])
    values, ids = logits.topk(1024, dim=-1)
    values = values / temps
    probs, keep, wider = limits.keep(values, torch.where(whole, norm, values[:, :1]))
    second = ~covered & wider
    assert torch.equal(both[~covered] >= 0, wider[~covered])
    if second.any():
        expected = ids.gather(1, _draw(probs * keep, uniform)[:, None]).flatten()
        assert (both[second] == expected[second]).float().mean() > 0.95
    assert (_sample_filtered(logits, temps, seqs, uniform, ops) >= 0).all()  # the rows sent back drawn too
    with pytest.raises(RuntimeError, match="width 5001 and wider 1024 must be in"):
        ops.draw_filtered_tokens(logits, (1 / temps).flatten(), limits.top_k, limits.top_p, limits.min_p, uniform,
                                 5001, 1024)
