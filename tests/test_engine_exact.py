"""Greedy output is token-exact against transformers `generate` in float32."""
from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from tests.conftest import TINY_CONFIGS, hf_greedy
from tests.support.kernel_tiers import RUNNABLE, ops_for

GREEDY = dict(temperature=0.0, ignore_eos=True)


def _prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _check(model_dir, prompts, max_tokens, **engine_args):
    llm = LLM(str(model_dir), dtype="float32", **engine_args)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(model_dir, prompts, max_tokens)
    return llm, outs


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_mixed_batch_matches_transformers(arch, tiny_model_dir):
    prompts = _prompts(6, (1, 70), 49152)
    _check(tiny_model_dir(arch), prompts, 24, block_size=4)


def test_chunked_prefill_matches(tiny_model_dir):
    prompts = _prompts(5, (20, 90), 49152, seed=1)
    llm, _ = _check(tiny_model_dir("llama3"), prompts, 16, block_size=4, max_num_batched_tokens=7)
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_preemption_matches(tiny_model_dir):
    prompts = _prompts(6, (10, 30), 49152, seed=2)
    llm, _ = _check(tiny_model_dir("qwen2"), prompts, 40, block_size=4, num_kv_blocks=24)
    assert llm.engine.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks


def test_prefix_cache_hits_match(tiny_model_dir):
    shared = _prompts(1, (40, 40), 49152, seed=3)[0]
    prompts = [shared + tail for tail in _prompts(4, (1, 9), 49152, seed=4)] + [shared]
    model_dir = tiny_model_dir("mistral")
    llm = LLM(str(model_dir), dtype="float32", block_size=4)
    params = SamplingParams(max_tokens=12, **GREEDY)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    assert all(o.num_cached_tokens >= 36 for o in rest)
    assert [o.token_ids for o in first + rest] == hf_greedy(model_dir, prompts, 12)


@pytest.mark.slow
def test_real_smollm2_matches(smollm_dir, tokenizer):
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"]
    prompts = [tokenizer.encode(t) for t in texts]
    llm, outs = _check(smollm_dir, prompts, 20, max_num_batched_tokens=16)
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                    SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    assert "Paris" in chat[0].text


def test_triton_kernel_backend_matches(tiny_model_dir):
    """The whole engine on the Triton kernels (Triton's interpreter on the CPU): chunked prefill, decode,
    prefix hits, GQA; greedy token-exact against transformers."""
    pytest.importorskip("triton")
    prompts = _prompts(3, (5, 30), 49152, seed=4)
    prompts.append(prompts[0][:12] + [7, 8, 9])  # a prefix hit
    llm, _ = _check(tiny_model_dir("llama3"), prompts, 8, block_size=4, max_num_batched_tokens=16,
                    attention_backend="triton")
    assert llm.engine.runner.backend.name == "triton"


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_cpu_kernel_backend_matches(tiny_model_dir, isa):
    """The C++ CPU kernels of every tier this CPU executes (every step fused per layer, the linears
    at::linear in float32): chunked prefill, decode, a prefix hit, preemption; greedy token-exact against
    transformers."""
    ops_for(isa)
    prompts = _prompts(5, (5, 60), 49152, seed=5)
    prompts.append(prompts[0][:12] + [7, 8, 9])
    llm, _ = _check(tiny_model_dir("qwen2"), prompts, 24, block_size=4, max_num_batched_tokens=16,
                    num_kv_blocks=40, attention_backend="cpu", cpu_isa=isa.value)
    assert llm.engine.runner.backend.name == "cpu" and llm.engine.runner.model.kernel_layers


def test_torch_backend_matches(tiny_model_dir):
    """The plain-torch path, which machines without the CPU kernels run."""
    prompts = _prompts(4, (5, 40), 49152, seed=6)
    llm, _ = _check(tiny_model_dir("llama3"), prompts, 12, block_size=4, attention_backend="torch")
    assert llm.engine.runner.model.kernel_layers is None


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_int8_matches_transformers_on_the_same_codes(tiny_model_dir, tmp_path, isa):
    """quantization int8 (weight-only, per output channel): greedy token-exact against transformers running
    the same codes times scales as float32 weights."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedllm.engine.kernels import cpu as cpu_kernels
    ops_for(isa)
    source = tiny_model_dir("llama3")  # untied: the LM head is quantized too, the embedding is not
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                codes, scale = cpu_kernels.quantize_int8(module.weight)
                module.weight.copy_(codes.float() * scale[:, None])
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    prompts = _prompts(4, (5, 50), 49152, seed=7)
    llm = LLM(str(source), dtype="float32", quantization="int8", block_size=4, max_num_batched_tokens=16,
              cpu_isa=isa.value)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, **GREEDY), use_tqdm=False)
    assert [o.token_ids for o in outs] == hf_greedy(tmp_path, prompts, 16)


def test_a_sample_row_outside_the_step_or_a_token_outside_the_vocabulary_is_refused_by_the_kernels(tiny_model_dir):
    """The C++ step copies the embedding's rows and the sampled rows without torch's index checks: an index past
    either is an error naming it, not a read past the tensor; so is a row naming no block table, or lists of
    unequal lengths."""
    llm = LLM(str(tiny_model_dir("llama3")), dtype="float32", attention_backend="cpu", block_size=4)
    model = llm.engine.runner.model
    calls = []
    forward_step = model._forward_step
    model._forward_step = lambda *args: calls.append(args) or forward_step(*args)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)
    kernel_model, input_ids, positions, slots, tables, token_seq, prefill, lens, sample_indices, lora, greedy = calls[0]
    assert (input_ids, positions, token_seq, sample_indices, lora, greedy) == ([5, 6, 7], [0, 1, 2], [0] * 3, [2],
                                                                               None, True)
    rest = (positions, slots, tables, token_seq, prefill, lens)
    with pytest.raises(RuntimeError, match=r"sample_indices\[0\] = 3 is not a row of hidden \(3 rows\)"):
        forward_step(kernel_model, input_ids, *rest, [3], lora, greedy)
    with pytest.raises(RuntimeError, match=r"input_ids\[2\] = 49152 is not a token of the vocabulary \(49152\)"):
        forward_step(kernel_model, [5, 6, 49152], *rest, sample_indices, lora, greedy)
    with pytest.raises(RuntimeError, match=r"token_seq\[1\] = 1 is not a block table \(1\)"):
        forward_step(kernel_model, input_ids, positions, slots, tables, [0, 1, 0], prefill, lens, sample_indices,
                     lora, greedy)
    with pytest.raises(RuntimeError, match="one entry per row"):
        forward_step(kernel_model, input_ids, positions[:2], *rest[1:], sample_indices, lora, greedy)


def test_the_kernels_model_is_made_once_per_cache_set_and_refuses_a_cache_count_unlike_its_layers(tiny_model_dir):
    """The C++ step's Model holds the layers and caches across steps (pybind copied them at every call before)."""
    llm = LLM(str(tiny_model_dir("llama3")), dtype="float32", attention_backend="cpu", block_size=4)
    model, caches = llm.engine.runner.model, llm.engine.runner.kv_caches
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    made = model.kernel_model
    assert made is not None and model.kernel_model_for(caches) is made
    with pytest.raises(RuntimeError, match="a KV cache per layer"):
        model.kernel_ops.Model(model.kernel_layers, model.kernel_head, model.embed_tokens.weight, model.rotary.cos,
                               model.rotary.sin, caches[:-1], [], True)


def test_an_odd_block_size_with_a_bf16_cache_on_the_kernels_is_refused(tiny_model_dir):
    """The kernels keep a bf16 cache's values in pairs of positions (kernels.h kv_index)."""
    with pytest.raises(ValueError, match="block_size: 5 is odd"):
        LLM(str(tiny_model_dir("llama3")), dtype="bfloat16", attention_backend="cpu", block_size=5)


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_a_bf16_prompt_found_in_the_prefix_cache_answers_as_computed_whole(smollm_dir, isa, quantization):
    """bf16 on the kernels, weights bf16 or int8: a prompt whose blocks are found in the prefix cache (its last
    tokens recomputed alone) gives the logprobs it gave computed whole. A prompt's rows always run on the path for
    many rows (AMX tiles; int8 codes as bf16 pairs on avx512_bf16), whose sums differ from the vectors' in their
    last bits, however few of them a step holds (SmolLM2's 30 layers carry such a difference to the logprobs; a
    tiny model's rounding to bf16 hides it)."""
    ops_for(isa)
    llm = LLM(str(smollm_dir), dtype="bfloat16", cpu_isa=isa.value, block_size=4, kv_cache_memory=1 << 26,
              quantization=quantization)
    prompt = _prompts(1, (42, 42), 49152, seed=5)[0]
    params = SamplingParams(max_tokens=6, logprobs=0, **GREEDY)
    whole = llm.generate([prompt], params, use_tqdm=False)[0]
    cached = llm.generate([prompt], params, use_tqdm=False)[0]
    assert cached.num_cached_tokens >= 40
    assert [p.logprob for p in cached.logprobs] == [p.logprob for p in whole.logprobs]
    assert cached.token_ids == whole.token_ids
