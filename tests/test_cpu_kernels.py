"""Each C++ CPU kernel computes what the plain-torch path computes (csrc/), on every tier this CPU executes:
the native one and each lower one (avx512_bf16 > avx512 > avx2 > portable on x86)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.engine.attention import (
    CacheGeometry,
    KernelMetadataLists,
    QueryGroup,
    TorchPagedAttention,
    build_metadata,
    kernel_metadata,
    kernel_metadata_lists,
)
from pagedllm.engine.huge_pages import HugePageArena
from pagedllm.engine.kernels import cpu as cpu_kernels
from pagedllm.engine.kernels.cpu import from_kernel_layout, to_kernel_layout
from pagedllm.engine.models.llama import RMSNorm, apply_rope
from tests.support.kernel_tiers import RUNNABLE, ops_for


@pytest.fixture(scope="module", params=RUNNABLE, ids=str)
def ops(request):
    return ops_for(request.param)


# narrow tiers: 70 strips, 150 panels; amx: tiles from 8 rows, in blocks of 16 or 32 (the last one zero-padded)
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16, 70, 150])
@pytest.mark.parametrize("out_features,bias", [(96, False), (100, True), (300, False)])
def test_bf16_linear_matches_f_linear(ops, rows, out_features, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(64, out_features, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
    out = cpu_kernels.KernelLinear(linear, "bf16", ops=ops)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 9, 17, 40, 150])  # narrow tiers: 40 strips, 150 panels; amx from 8
# amx: 600 channels are 7 pairs of groups, the last one half, several to a thread: each converted during the one before
@pytest.mark.parametrize("in_features,out_features", [(96, 200), (192, 600)])
def test_int8_linear_matches_its_dequantized_weights(ops, dtype, rows, in_features, out_features):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=True).to(dtype)
    codes, scale = cpu_kernels.quantize_int8(linear.weight)
    x = torch.randn(rows, in_features, dtype=dtype)
    expected = F.linear(x.float(), codes.float() * scale[:, None], linear.bias.float())
    arena = HugePageArena(cpu_kernels.packed_nbytes(linear, "int8"))
    out = cpu_kernels.KernelLinear(linear, "int8", arena, ops)(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kind,dtype", [("bf16", torch.bfloat16), ("int8", torch.bfloat16), ("int8", torch.float32)])
@pytest.mark.parametrize("rows", [1, 8, 40, 150])
def test_weights_fetched_non_temporally_give_the_same_outputs(ops, kind, dtype, rows):
    """Only the hint of the tiles' fetches changes (kernels.h fetch_weights; on AMD's CPUs, cpu_isa.py), so the
    outputs are the same bits, on every tier and path."""
    torch.manual_seed(rows)
    linear = nn.Linear(192, 600, bias=kind == "int8").to(dtype)
    x = torch.randn(rows, 192, dtype=dtype)
    plain, non_temporal = (cpu_kernels.KernelLinear(linear, kind, ops=ops, non_temporal=nt) for nt in (False, True))
    assert torch.equal(non_temporal(x), plain(x))


def test_many_rows_run_on_amx_tiles_on_the_amx_tier_and_other_widths_keep_the_vector_tiles(ops):
    """The amx tier's linears of 8 rows or more run on AMX tiles (the OS granting them, as Linux
    5.16+ does); an input width that is not a whole number of tiles (32) keeps vdpbf16ps there, with the same
    results."""
    assert ops.amx_tiles() == (ops.isa == "amx")
    torch.manual_seed(1)
    linear = nn.Linear(80, 100, bias=True).to(torch.bfloat16)
    x = torch.randn(70, 80, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    out = cpu_kernels.KernelLinear(linear, "bf16", ops=ops)(x)
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_int8_codes_are_close_to_the_weights():
    w = torch.randn(64, 128)
    codes, scale = cpu_kernels.quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_matches_module(ops, dtype):
    torch.manual_seed(0)
    norm = RMSNorm(72, 1e-5).to(dtype)
    norm.weight.data = torch.randn(72).to(dtype)
    x, residual = torch.randn(5, 72, dtype=dtype), torch.randn(5, 72, dtype=dtype)
    torch.testing.assert_close(ops.rms_norm(x, None, norm.weight.detach(), 1e-5), norm(x))
    expected_residual = residual + x
    out = ops.rms_norm(x, residual, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(residual, expected_residual)  # updated in place
    torch.testing.assert_close(out, norm(expected_residual))


def _cache_and_meta(geo: CacheGeometry, context_lens: list[int], dtype: torch.dtype, seed: int = 0):
    """A random cache, block tables spread over it, and the torch path's decode metadata."""
    torch.manual_seed(seed)
    cache = torch.randn(geo.shape, dtype=dtype)
    perm = torch.randperm(geo.num_blocks).tolist()
    tables, used = [], 0
    for ctx in context_lens:
        n = -(-ctx // geo.block_size)
        tables.append(perm[used:used + n])
        used += n
    slots = [t[(c - 1) // geo.block_size] * geo.block_size + (c - 1) % geo.block_size
             for t, c in zip(tables, context_lens)]
    groups = [QueryGroup(0, len(tables), 1, tables, context_lens)]
    return cache, build_metadata(slots, groups, geo, dtype, torch.device("cpu")), \
        build_metadata(slots, groups, geo, dtype, torch.device("cpu"), kernel_only=True).kernel


def test_the_kernels_metadata_lists_are_what_their_tensors_hold():
    """The C++ step takes the lists as the runner lays a step out (a row per token, a table per sequence, unpadded);
    kernel_metadata packs the same lists into the tensors the Triton kernels and the single ops read."""
    groups = [QueryGroup(0, 2, 1, [[7, 3], [5]], [20, 9]), QueryGroup(2, 1, 3, [[1, 2, 4]], [40], prefill=True)]
    slots = [115, 89, 69, 70, 71]
    k = kernel_metadata_lists(slots, groups)
    assert k == KernelMetadataLists(slots, [[7, 3], [5], [1, 2, 4]], [0, 1, 2, 2, 2], [20, 9, 38, 39, 40], [0, 0, 1])
    t = kernel_metadata(slots, groups, torch.device("cpu"))
    assert t.block_tables.tolist() == [[7, 3, 0], [5, 0, 0], [1, 2, 4]] and t.block_tables.dtype == torch.int32
    assert (t.slot_mapping.tolist(), t.token_seq.tolist(), t.context_lens.tolist(), t.prefill_seqs.tolist()) == (
        k.slot_mapping, k.token_seq, k.context_lens, k.prefill_seqs)


def test_bf16_cache_layout_pairs_dims_of_keys_and_positions_of_values():
    """kernels.h kv_index: in a block, bf16 keys are K^T in pairs of dims, values pairs of positions."""
    cache = torch.arange(2 * 1 * 2 * 4 * 6, dtype=torch.float32).view(2, 1, 2, 4, 6).to(torch.bfloat16)
    laid = to_kernel_layout(cache)
    keys, values = laid[0, 0, 1].flatten(), laid[1, 0, 1].flatten()  # block 1 of KV head 0
    k, v = cache[0, 0, 1], cache[1, 0, 1]  # [position, dim]
    assert keys[:4].tolist() == [k[0, 0], k[0, 1], k[1, 0], k[1, 1]]
    assert values[:4].tolist() == [v[0, 0], v[1, 0], v[0, 1], v[1, 1]]
    assert torch.equal(from_kernel_layout(laid), cache)
    floats = cache.float()
    assert torch.equal(to_kernel_layout(floats), floats)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64)])
def test_rope_and_kv_write_match_torch(ops, dtype, heads, kv_heads, head_dim):
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=12, block_size=4)
    context_lens = [3, 9, 17]
    cache, meta, kernel = _cache_and_meta(geo, context_lens, dtype)
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    positions = torch.tensor([c - 1 for c in context_lens])
    freqs = torch.arange(64, dtype=torch.float32)[:, None] * (1e4 ** (-torch.arange(0, head_dim, 2) / head_dim))
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    view = qkv.view(3, heads + 2 * kv_heads, head_dim).float()
    rotated = apply_rope(view[:, :heads + kv_heads], cos[positions][:, None], sin[positions][:, None])
    expected_cache = cache.clone()
    TorchPagedAttention(heads, kv_heads, head_dim).write_kv(
        torch.cat((rotated[:, heads:], view[:, heads + kv_heads:]), 1).to(dtype), expected_cache, meta)
    cache = to_kernel_layout(cache)
    q = ops.rope_and_write_kv(qkv, cos, sin, positions, kernel.slot_mapping, cache, heads, kv_heads, head_dim)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(q.float(), rotated[:, :heads].reshape(3, -1), **tol)
    torch.testing.assert_close(from_kernel_layout(cache).float(), expected_cache.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context_lens", [[1], [5, 16, 33], [700], [300, 1100]])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(6, 2, 32, 8), (9, 3, 64, 16), (8, 2, 128, 16), (10, 2, 80, 12)])
def test_paged_attention_matches_torch(ops, dtype, context_lens, heads, kv_heads, head_dim, block_size):
    """Short contexts, block boundaries, and long ones that the kernel splits and merges; the generic
    loop and (bf16, head_dim 64 or 128) the one with registers for its accumulators; a group of 5, head_dim 80
    and blocks of 12 on the general one."""
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=200, block_size=block_size)
    cache, meta, kernel = _cache_and_meta(geo, context_lens, dtype, seed=len(context_lens))
    q = torch.randn(len(context_lens), heads * head_dim, dtype=dtype)
    attention = TorchPagedAttention(heads, kv_heads, head_dim)
    expected = torch.cat([attention._attend_group(q.view(-1, heads, head_dim), cache, g) for g in meta.groups])
    out = ops.paged_attention(q, to_kernel_layout(cache), kernel.block_tables, kernel.token_seq, kernel.prefill_seqs,
                              kernel.context_lens,
                              heads, kv_heads, head_dim, head_dim ** -0.5)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.float(), expected.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_without_its_own_fetches_gives_the_same_outputs(ops, dtype):
    """Decode rows leave the blocks ahead to the hardware's prefetcher on AMD's CPUs (cpu_isa.py fetches_kv_ahead):
    only fetches change, so the outputs are the same bits, long contexts split and merged included."""
    geo = CacheGeometry(9, 3, 64, num_blocks=200, block_size=16)
    cache, _, kernel = _cache_and_meta(geo, [300, 1100], dtype)
    q = torch.randn(2, 9 * 64, dtype=dtype)
    args = (q, to_kernel_layout(cache), kernel.block_tables, kernel.token_seq, kernel.prefill_seqs,
            kernel.context_lens, 9, 3, 64, 0.125)
    assert torch.equal(ops.paged_attention(*args, fetch_ahead=False), ops.paged_attention(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt", [False, True], ids=["decode", "prompt"])
def test_positions_past_the_context_never_reach_the_output(ops, dtype, prompt):
    """A freed block's old keys and values may be anything: inf and NaN past a context of 7 (an odd one, whose
    last bf16 value pair holds position 7 too) leave the result as it was, for a decode row and for a prompt's
    7 tokens attended as a tile."""
    geo = CacheGeometry(9, 3, 64, num_blocks=4, block_size=16)
    cache, _, kernel = _cache_and_meta(geo, [7], dtype)
    rows = 7 if prompt else 1
    if prompt:
        group = QueryGroup(0, 1, rows, [kernel.block_tables[0, :1].tolist()], [7], prefill=True)
        kernel = build_metadata([0] * rows, [group], geo, dtype, torch.device("cpu"), kernel_only=True).kernel
    q = torch.randn(rows, 9 * 64, dtype=dtype)
    tables = kernel.block_tables.index_select(0, kernel.token_seq)
    args = (tables, kernel.token_seq, kernel.prefill_seqs, kernel.context_lens, 9, 3, 64, 0.125)
    clean = ops.paged_attention(q, to_kernel_layout(cache), *args)
    block = kernel.block_tables[0, 0]
    cache[0, :, block, 7:], cache[1, :, block, 7:] = float("inf"), float("nan")
    torch.testing.assert_close(ops.paged_attention(q, to_kernel_layout(cache), *args), clean, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("runs", [
    [(40, 40, True)],  # a first chunk: (new tokens, context after them, prompt tokens)
    # decodes, a later chunk, a prompt's last token alone (after a prefix hit), a speculative run (decode rows)
    [(1, 9, False), (37, 100, True), (1, 300, False), (1, 8, True), (5, 20, False)],
    [(300, 1100, True)],  # a long chunk past many earlier positions: tiles of uneven cost
])
# amx: bf16 caches in blocks of whole chunks (16, 32) on AMX tiles, spans of 64 positions
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size",
                         [(6, 2, 32, 8), (9, 3, 64, 16), (8, 2, 128, 12), (8, 2, 128, 32)])
def test_prefill_attention_matches_torch(ops, dtype, runs, heads, kv_heads, head_dim, block_size):
    """Prefill chunks (runs of one sequence's prompt tokens, causal within the run) attended in query tiles beside
    decode rows in the same step, against torch attention with its causal bias; a block size that is not a
    multiple of the key chunk (12) included."""
    geo = CacheGeometry(heads, kv_heads, head_dim, num_blocks=200, block_size=block_size)
    cache, _, _ = _cache_and_meta(geo, [ctx for _, ctx, _ in runs], dtype, seed=len(runs))
    torch.manual_seed(len(runs))
    perm, tables, used = torch.randperm(geo.num_blocks).tolist(), [], 0
    groups, start = [], 0
    for n, ctx, prefill in runs:
        tables.append(perm[used:used + -(-ctx // block_size)])
        used += len(tables[-1])
        groups.append(QueryGroup(start, 1, n, [tables[-1]], [ctx], prefill=prefill))
        start += n
    slots = [0] * start  # nothing is written: the cache already holds every position
    meta = build_metadata(slots, groups, geo, dtype, torch.device("cpu"))
    kernel = build_metadata(slots, groups, geo, dtype, torch.device("cpu"), kernel_only=True).kernel
    q = torch.randn(start, heads * head_dim, dtype=dtype)
    attention = TorchPagedAttention(heads, kv_heads, head_dim)
    attention.compute_dtype = torch.float32
    expected = torch.cat([attention._attend_group(q.view(-1, heads, head_dim), cache, g) for g in meta.groups])
    tables = kernel.block_tables.index_select(0, kernel.token_seq)
    out = ops.paged_attention(q, to_kernel_layout(cache), tables, kernel.token_seq,
                              kernel.prefill_seqs, kernel.context_lens, heads, kv_heads, head_dim, head_dim ** -0.5)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.float(), expected.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(ops, dtype):
    gate_up = torch.randn(3, 2 * 40, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, **tol)
