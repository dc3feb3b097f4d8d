"""Speculative decoding inside the engine: the same greedy output with and without it, stops inside an
accepted run, the sampled distribution unchanged, streaming with several tokens per step, and a KV cache
left as it was."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
GREEDY = dict(temperature=0.0, ignore_eos=True)


def repetitive(seed: int, vocab: int = 49152) -> list[int]:
    rng = random.Random(seed)
    pattern = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 7))]
    return pattern * rng.randint(3, 6) + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 3))]


def scattered(seed: int, vocab: int = 49152) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(rng.randint(1, 40))]


def pair(model_dir, **engine_args) -> tuple[LLM, LLM]:
    common = dict(dtype="float32", block_size=4, **engine_args)
    return LLM(str(model_dir), **common), LLM(str(model_dir), speculative_config=SPEC, **common)


def outputs(llm: LLM, prompts, params) -> list[tuple]:
    return [(o.token_ids, o.text, o.finish_reason) for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_all_blocks_free(llm: LLM) -> None:
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == llm.engine.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


@pytest.fixture(scope="module")
def smollm(smollm_dir) -> tuple[LLM, LLM]:
    """SmolLM2 in float32 without and with speculation: a real model copies from its prompt, so drafts
    are kept in long runs."""
    common = dict(dtype="float32", kv_cache_memory=128 << 20, block_size=8)
    return LLM(str(smollm_dir), **common), LLM(str(smollm_dir), speculative_config=SPEC, **common)


COPY_TASKS = ["Repeat exactly: the cat sat on the mat, the dog sat on the log, the cat sat on the mat.",
              "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\nRename add to plus.",
              "Alice: 3 apples. Bob: 5 pears. Carol: 2 plums. List each person with their fruit.",
              "What is the capital of France?"]


def chats(llm: LLM, texts: list[str]) -> list[list[int]]:
    return [llm.engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_output_is_the_same_with_and_without_speculation(arch, tiny_model_dir):
    off, on = pair(tiny_model_dir(arch))
    prompts = [repetitive(s) for s in range(4)] + [scattered(s) for s in range(3)]
    first = off.generate(prompts[:4], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)
    prompts += [p + o.token_ids + p + o.token_ids[:2] for p, o in zip(prompts, first)]  # its own words again
    params = SamplingParams(max_tokens=24, **GREEDY)
    assert outputs(on, prompts, params) == outputs(off, prompts, params)
    assert on.engine.speculator.num_draft_tokens > 0
    assert_all_blocks_free(on)


def test_greedy_output_is_the_same_on_the_real_model(smollm):
    off, on = smollm
    prompts = chats(off, COPY_TASKS)
    params = SamplingParams(temperature=0.0, max_tokens=48)
    before = on.engine.speculator.num_accepted_tokens
    assert outputs(on, prompts, params) == outputs(off, prompts, params)
    assert on.engine.speculator.num_accepted_tokens - before > 20
    assert_all_blocks_free(on)


def test_whatever_ends_a_sequence_inside_an_accepted_run_ends_it_there(smollm, tiny_model_dir):
    off, on = smollm
    frees = off.generate(chats(off, COPY_TASKS[:3]), SamplingParams(max_tokens=40, temperature=0.0), use_tqdm=False)
    free = max(frees, key=lambda o: len(o.token_ids))
    prompt, tokens = free.prompt_token_ids, free.token_ids
    n = len(tokens)
    assert n >= 16, off.tokenizer.decode(tokens)
    stop_text = off.tokenizer.decode(tokens[2 * n // 3:2 * n // 3 + 2])
    cases = [SamplingParams(max_tokens=n // 2 + 1, temperature=0.0),
             SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[tokens[n // 2]]),
             SamplingParams(max_tokens=40, temperature=0.0, stop=[stop_text]),
             SamplingParams(max_tokens=40, temperature=0.0, stop=[stop_text], include_stop_str_in_output=True),
             SamplingParams(max_tokens=40, temperature=0.0, logprobs=2)]
    before = on.engine.speculator.num_accepted_tokens
    for params in cases:
        assert outputs(on, [prompt], params) == outputs(off, [prompt], params), params
    assert on.engine.speculator.num_accepted_tokens - before > 10
    short_off, short_on = pair(tiny_model_dir("llama3"), max_model_len=40)
    looped = repetitive(3)[:30]
    params = SamplingParams(max_tokens=None, **GREEDY)
    assert outputs(short_on, [looped], params) == outputs(short_off, [looped], params)
    assert outputs(short_on, [looped], params)[0][2] == "length"
    assert_all_blocks_free(on)


def test_deltas_concatenate_to_the_output_with_several_tokens_per_step(smollm):
    _, on = smollm
    on.engine.output.stream_interval = 3
    try:
        params = SamplingParams(max_tokens=40, temperature=0.0, logprobs=1)
        prompts = chats(on, COPY_TASKS[:3])
        for i, p in enumerate(prompts):
            on.engine.add_request(f"r{i}", p, params)
        deltas: dict[str, list] = {}
        while on.engine.has_unfinished_requests():
            for d in on.engine.step():
                deltas.setdefault(d.request_id, []).append(d)
        expected = {f"r{i}": o for i, o in enumerate(on.generate(prompts, params, use_tqdm=False))}
    finally:
        on.engine.output.stream_interval = 1
    for rid, ds in deltas.items():
        assert "".join(d.new_text for d in ds) == expected[rid].text
        assert sum((d.new_token_ids for d in ds), []) == expected[rid].token_ids
        assert [lp.token_id for d in ds for lp in d.new_logprobs] == expected[rid].token_ids
        assert all(len(d.new_token_ids) >= 3 for d in ds[1:-1])  # stream_interval counts tokens, not steps
    assert max(len(d.new_token_ids) for ds in deltas.values() for d in ds) > 3  # several tokens in one step


def test_sampled_outputs_follow_the_same_distribution(tiny_model_dir):
    """Many seeds, spec on against off: the distribution of 4-token outputs is as close as two runs
    without speculation on different seeds are (each run is seeded, so the test is deterministic). A
    16-token vocabulary makes the model repeat itself, so drafts are proposed, kept and rejected."""
    off, on = pair(tiny_model_dir("llama3", vocab_size=16))
    start = [3, 4, 5, 6, 7]
    own = off.generate([start], SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].token_ids
    prompt = start + own + start  # what followed `start` before is a good guess: the drafts get kept

    def sample(llm: LLM, seeds: range) -> Counter:
        params = [SamplingParams(max_tokens=4, temperature=0.5, seed=s, ignore_eos=True) for s in seeds]
        return Counter(tuple(o.token_ids) for o in llm.generate([prompt] * len(seeds), params, use_tqdm=False))

    def total_variation(a: Counter, b: Counter) -> float:
        n_a, n_b = sum(a.values()), sum(b.values())
        return sum(abs(a[k] / n_a - b[k] / n_b) for k in set(a) | set(b)) / 2

    n = 1000
    assert sample(on, range(20)) == sample(on, range(20))  # seeded requests are reproducible with speculation
    before = on.engine.speculator.num_accepted_tokens
    with_spec, without = sample(on, range(n)), sample(off, range(n, 2 * n))
    without_again = sample(off, range(2 * n, 3 * n))
    noise = total_variation(without, without_again)
    accepted = on.engine.speculator.num_accepted_tokens - before
    distance = total_variation(with_spec, without)
    print(f"accepted {accepted}, TV {distance:.3f}, noise {noise:.3f}, {len(without)} outcomes")
    assert accepted > n // 5  # the drafts were tested, and often kept
    assert distance < max(0.1, 1.5 * noise), (noise, with_spec.most_common(5), without.most_common(5))
