"""The int8 KV cache: kv_quant.py's definition, the kernels against the torch path that applies the same quantization
(on every tier this CPU executes), and the engine with preemption, chunked prefill and prefix hits under it."""
from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine import kv_quant
from pagedllm.engine.attention import CacheGeometry, QueryGroup, TorchPagedAttention, build_metadata
from pagedllm.engine.config import EngineConfig, ModelConfig, num_blocks_for
from pagedllm.engine.kernels.cpu import from_kernel_layout, to_kernel_layout
from pagedllm.engine.models.llama import apply_rope
from tests.support.kernel_tiers import RUNNABLE, ops_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=RUNNABLE, ids=str)
def ops(request):
    return ops_for(request.param)


def test_codes_never_clip_and_round_to_nearest():
    torch.manual_seed(0)
    x = torch.randn(50, 64) * torch.logspace(-30, 6, 50)[:, None]
    codes, scales = kv_quant.quantize(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (50,)
    assert scales.float().ge(x.abs().amax(-1) / 127).all()  # rounded up: the largest is at most 127 codes
    assert codes.abs().max() <= 127 and codes.abs().amax(-1).ge(126).all()
    error = (kv_quant.dequantize(codes, scales) - x).abs()
    assert error.le(scales.float()[:, None] / 2 * (1 + 1e-6)).all()


def test_a_zero_row_has_zero_codes():
    codes, scales = kv_quant.quantize(torch.zeros(3, 8, dtype=torch.bfloat16))
    assert codes.eq(0).all() and scales.float().eq(kv_quant.MIN_SCALE).all()
    assert kv_quant.dequantize(codes, scales).eq(0).all()


def test_a_block_holds_its_codes_then_its_scales():
    cache = torch.zeros(kv_quant.cache_shape(num_kv_heads=2, num_blocks=3, block_size=4, head_dim=6), dtype=torch.int8)
    codes, scales = kv_quant.split(cache)
    assert codes.shape == (2, 2, 3, 4, 6) and scales.shape == (2, 2, 3, 4)
    codes[1, 0, 2, 3, 5], scales[1, 0, 2, 3] = 7, 1.5
    block = cache.view(2, 2, 3, 4 * 8)[1, 0, 2]
    assert block[4 * 6 - 1] == 7 and block[4 * 6:].view(torch.bfloat16)[3] == 1.5


def test_int8_holds_about_twice_the_blocks():
    model = ModelConfig("LlamaForCausalLM", 49152, 576, 1536, 30, 9, 3, 64, 1e-5, 1e5, None, 2048, True, False, None,
                        [2])
    auto = num_blocks_for(EngineConfig(kv_cache_memory=1 << 30), model)
    int8 = num_blocks_for(EngineConfig(kv_cache_memory=1 << 30, kv_cache_dtype="int8"), model)
    assert int8 == (1 << 30) // (2 * 30 * 16 * 3 * 66) and 1.93 < int8 / auto < 1.94


def test_an_unknown_kv_cache_dtype_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="kv_cache_dtype: 'fp8' is not one of auto, int8"):
        EngineConfig(kv_cache_dtype="fp8")


def _int8(cache: torch.Tensor) -> torch.Tensor:
    """A float cache [2, KVH, blocks, BS, D] quantized into an int8 one, row-major (the torch backend's layout)."""
    two, kvh, blocks, bs, d = cache.shape
    out = torch.zeros(kv_quant.cache_shape(kvh, blocks, bs, d), dtype=torch.int8)
    codes, scales = kv_quant.split(out)
    codes[...], scales[...] = kv_quant.quantize(cache)
    return out


def _tables(geo: CacheGeometry, context_lens: list[int], seed: int) -> list[list[int]]:
    perm, tables, used = torch.randperm(geo.num_blocks, generator=torch.Generator().manual_seed(seed)).tolist(), [], 0
    for ctx in context_lens:
        tables.append(perm[used:used + -(-ctx // geo.block_size)])
        used += len(tables[-1])
    return tables


def test_the_torch_path_writes_what_quantize_defines():
    geo = CacheGeometry(4, 2, 16, num_blocks=6, block_size=4, int8=True)
    cache = torch.zeros(geo.shape, dtype=torch.int8)
    kv = torch.randn(5, 4, 16)
    slots = [3, 9, 10, 17, 22]
    meta = build_metadata(slots, [QueryGroup(0, 5, 1, [[0]] * 5, [1] * 5)], geo, torch.float32, CPU)
    TorchPagedAttention(4, 2, 16).write_kv(kv, cache, meta)
    codes, scales = kv_quant.split(cache)
    want_codes, want_scales = kv_quant.quantize(kv)
    for t, slot in enumerate(slots):
        for row in range(4):
            at = (row // 2, row % 2, slot // 4, slot % 4)
            assert torch.equal(codes[at], want_codes[t, row]) and scales[at] == want_scales[t, row]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64)])
def test_kernels_write_the_codes_quantize_defines(ops, dtype, heads, kv_heads, head_dim):
    """Values exactly; keys (rotated by the kernels, in their own float order) within one code."""
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=12, block_size=4, int8=True)
    context_lens = [3, 9, 17]
    tables = _tables(geo, context_lens, seed=1)
    slots = [t[(c - 1) // 4] * 4 + (c - 1) % 4 for t, c in zip(tables, context_lens)]
    meta = build_metadata(slots, [QueryGroup(0, 3, 1, tables, context_lens)], geo, dtype, CPU)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    positions = torch.tensor([c - 1 for c in context_lens])
    freqs = torch.arange(64, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    view = qkv.view(3, heads + 2 * kv_heads, head_dim)
    rotated = apply_rope(view[:, :heads + kv_heads].float(), cos[positions][:, None], sin[positions][:, None])
    expected = torch.zeros(geo.shape, dtype=torch.int8)
    kv = torch.cat((rotated[:, heads:].to(dtype), view[:, heads + kv_heads:]), 1)
    TorchPagedAttention(heads, kv_heads, head_dim).write_kv(kv, expected, meta)
    cache = torch.zeros(geo.shape, dtype=torch.int8)
    ops.rope_and_write_kv(qkv, cos, sin, positions, torch.tensor(slots, dtype=torch.int32), cache, heads, kv_heads,
                          head_dim)
    codes, scales = kv_quant.split(from_kernel_layout(cache))
    want_codes, want_scales = kv_quant.split(expected)
    assert torch.equal(codes[1], want_codes[1]) and torch.equal(scales[1], want_scales[1])
    assert (codes[0].int() - want_codes[0].int()).abs().max() <= 1
    torch.testing.assert_close(scales[0].float(), want_scales[0].float(), rtol=1e-2, atol=0)


def _reference(q, cache, groups, geo, dtype):
    """Torch attention in float32 over the int8 cache, dequantized as it is gathered."""
    meta = build_metadata([0] * len(q), groups, geo, dtype, CPU)
    attention = TorchPagedAttention(geo.num_heads, geo.num_kv_heads, geo.head_dim)
    attention.compute_dtype = torch.float32
    return torch.cat([attention._attend_group(q.view(len(q), geo.num_heads, -1), cache, g) for g in meta.groups])


# The decode kernel rounds each query to int16 and each chunk's weights to int16 (2^-16 of the largest): close to
# the float32 reference, not equal to it.
TOLERANCE = {torch.float32: {"rtol": 2e-3, "atol": 2e-3}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_lens", [[1], [5, 16, 33], [700], [300, 1100]])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(6, 2, 32, 8), (9, 3, 64, 16), (8, 2, 128, 16), (10, 2, 80, 12)])
def test_decode_attention_matches_the_quantizing_reference(ops, dtype, context_lens, heads, kv_heads, head_dim,
                                                           block_size):
    """Short contexts, block ends, long ones split and merged; the general loop (a group of 5, head_dim 80, blocks of
    12) and the ones with registers (groups of 3 and 4, head_dim 64 and 128)."""
    torch.manual_seed(len(context_lens))
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=200, block_size=block_size, int8=True)
    cache = _int8(torch.randn(2, kv_heads, 200, block_size, head_dim) * 3)
    groups = [QueryGroup(0, len(context_lens), 1, _tables(geo, context_lens, seed=2), context_lens)]
    q = torch.randn(len(context_lens), heads * head_dim, dtype=dtype)
    expected = _reference(q, cache, groups, geo, dtype)
    k = build_metadata([0] * len(q), groups, geo, dtype, CPU, kernel_only=True).kernel
    out = ops.paged_attention(q, to_kernel_layout(cache), k.block_tables, k.token_seq, k.prefill_seqs, k.context_lens,
                              heads, kv_heads, head_dim, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("runs", [
    [(40, 40, True)],  # (new tokens, context after them, prompt tokens)
    [(1, 9, False), (37, 100, True), (1, 300, False), (1, 8, True), (5, 20, False)],
    [(300, 1100, True)],
])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(6, 2, 32, 8), (9, 3, 64, 16), (8, 2, 128, 12)])
def test_prefill_attention_matches_the_quantizing_reference(ops, dtype, runs, heads, kv_heads, head_dim, block_size):
    """Prefill tiles (causal within a run) beside decode rows and speculative runs in one step."""
    torch.manual_seed(len(runs))
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=200, block_size=block_size, int8=True)
    cache = _int8(torch.randn(2, kv_heads, 200, block_size, head_dim) * 3)
    tables = _tables(geo, [ctx for _, ctx, _ in runs], seed=3)
    groups, start = [], 0
    for (n, ctx, prefill), table in zip(runs, tables):
        groups.append(QueryGroup(start, 1, n, [table], [ctx], prefill=prefill))
        start += n
    q = torch.randn(start, heads * head_dim, dtype=dtype)
    expected = _reference(q, cache, groups, geo, dtype)
    k = build_metadata([0] * start, groups, geo, dtype, CPU, kernel_only=True).kernel
    out = ops.paged_attention(q, to_kernel_layout(cache), k.block_tables.index_select(0, k.token_seq), k.token_seq,
                              k.prefill_seqs, k.context_lens, heads, kv_heads, head_dim, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("prefill", [False, True])
def test_positions_past_the_context_never_reach_the_output(ops, prefill):
    """A freed block's old codes may be anything and its scales inf or NaN: past a context of 7 (odd: its last value
    pair holds position 7 too), they leave the result as it was."""
    geo = CacheGeometry(9, 3, 64, num_blocks=4, block_size=16, int8=True)
    cache = _int8(torch.randn(2, 3, 4, 16, 64))
    groups = [QueryGroup(0, 1, 1, [[2]], [7], prefill=prefill)]
    k = build_metadata([0], groups, geo, torch.bfloat16, CPU, kernel_only=True).kernel
    q = torch.randn(1, 9 * 64, dtype=torch.bfloat16)
    args = (k.block_tables, k.token_seq, k.prefill_seqs, k.context_lens, 9, 3, 64, 0.125)
    clean = ops.paged_attention(q, to_kernel_layout(cache), *args)
    codes, scales = kv_quant.split(cache)
    codes[:, :, 2, 7:], scales[0, :, 2, 7:], scales[1, :, 2, 7:] = 127, float("inf"), float("nan")
    torch.testing.assert_close(ops.paged_attention(q, to_kernel_layout(cache), *args), clean, rtol=0, atol=0)


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randint(5, 60))] for _ in range(5)]
    return prompts + [prompts[0][:12] + [7, 8, 9]]  # a prefix hit


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_the_engine_on_the_kernels_answers_as_the_torch_path(tiny_model_dir, isa):
    """Chunked prefill, decode, a prefix hit and preemption (a small pool) under an int8 cache, on every tier: greedy
    tokens equal to the plain-torch path quantizing the same way (float32 weights)."""
    ops_for(isa)
    model_dir = str(tiny_model_dir("qwen2"))
    settings = dict(dtype="float32", block_size=4, max_num_batched_tokens=16, num_kv_blocks=40, kv_cache_dtype="int8")
    kernels = LLM(model_dir, attention_backend="cpu", cpu_isa=isa.value, **settings)
    torch_path = LLM(model_dir, attention_backend="torch", **settings)
    outs = [[o.token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)] for llm in (kernels, torch_path)]
    assert outs[0] == outs[1]
    assert kernels.engine.num_preemptions > 0 and kernels.engine.runner.kv_caches[0].dtype == torch.int8
    rest = kernels.generate([_prompts()[0][:12] + [9, 9]], GREEDY, use_tqdm=False)
    assert rest[0].num_cached_tokens >= 12
    assert kernels.engine.block_manager.num_free_blocks == kernels.engine.num_blocks


def test_an_odd_block_size_with_an_int8_cache_on_the_kernels_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="block_size: 5 is odd; the CPU kernels keep int8 KV caches"):
        LLM(str(tiny_model_dir("llama3")), dtype="float32", block_size=5, attention_backend="cpu",
            kv_cache_dtype="int8")


def test_speculative_decoding_under_an_int8_cache_keeps_the_greedy_answer(tiny_model_dir):
    """Drafts verified as decode rows, rejected ones' codes overwritten: the same tokens as without speculation (a
    16-token vocabulary makes the model repeat itself, so drafts are kept and rejected)."""
    from tests.test_speculative_engine import SPEC
    model_dir = str(tiny_model_dir("llama3", vocab_size=16))
    settings = dict(dtype="float32", block_size=4, kv_cache_dtype="int8")
    plain, speculative = LLM(model_dir, **settings), LLM(model_dir, speculative_config=SPEC, **settings)
    start = [3, 4, 5, 6, 7]
    own = plain.generate([start], GREEDY, use_tqdm=False)[0].token_ids
    prompts = [start + own + start, own[:9] + start, start * 3]
    outs = [[o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] for llm in (plain, speculative)]
    assert outs[0] == outs[1]
    assert speculative.engine.speculator.num_accepted_tokens > 0
    assert speculative.engine.speculator.num_draft_tokens > speculative.engine.speculator.num_accepted_tokens
