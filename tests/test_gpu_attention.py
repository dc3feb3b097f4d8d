"""The GPU attention kernels (OpenAI Triton language) against the torch reference, on small shapes, in
Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU; on a GPU the same
tests run compiled kernels)."""
from __future__ import annotations

import pytest
import torch

gpu_attention = pytest.importorskip("pagedllm.engine.kernels.gpu_attention")
from pagedllm.engine.attention import CacheGeometry, QueryGroup, TorchPagedAttention, build_metadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_batch(seed: int, query_lens: list[int], context_lens: list[int], geo: CacheGeometry):
    """Sequences with shuffled block tables; each sees `context_len` positions, the last `query_len` new."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(geo.num_blocks, generator=g).tolist()
    tables, slots = [], []
    for q_len, ctx in zip(query_lens, context_lens):
        n = -(-ctx // geo.block_size)
        table, blocks = blocks[:n], blocks[n:]
        tables.append(table)
        slots += [table[p // geo.block_size] * geo.block_size + p % geo.block_size for p in range(ctx - q_len, ctx)]
    return tables, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_lens,context_lens,splits", [
    ([1, 1, 1], [5, 17, 33], 4),          # decode, contexts over several splits
    ([1, 1], [64, 3], 8),                 # a long context split 8 ways beside a short one
    ([6], [6], 2),                        # a prefill
    ([4, 1], [9, 12], 4),                 # a chunked prefill with a decode
])
def test_kernels_match_the_torch_reference(dtype, query_lens, context_lens, splits):
    geo = CacheGeometry(num_heads=4, num_kv_heads=2, head_dim=16, num_blocks=64, block_size=4)
    tables, slots = random_batch(0, query_lens, context_lens, geo)
    t = sum(query_lens)
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(geo.shape, generator=g).to(dtype)
    q = torch.randn(t, geo.num_heads, geo.head_dim, generator=g).to(dtype)
    kv = torch.randn(t, 2 * geo.num_kv_heads, geo.head_dim, generator=g).to(dtype)

    ref_cache = cache.clone()
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    groups = [QueryGroup(s, 1, n, [tab], [c]) for s, n, tab, c in zip(starts, query_lens, tables, context_lens)]
    meta = build_metadata(slots, groups, geo, dtype, torch.device("cpu"))
    expected = TorchPagedAttention(geo.num_heads, geo.num_kv_heads, geo.head_dim).forward(q, kv, ref_cache, meta)

    dev_cache = cache.to(DEVICE)
    gpu_attention.write_kv(kv.to(DEVICE), dev_cache, torch.tensor(slots, dtype=torch.int32, device=DEVICE))
    assert torch.equal(dev_cache.cpu(), ref_cache)
    width = max(len(tab) for tab in tables)
    block_tables = torch.tensor([tab + [0] * (width - len(tab)) for tab in tables], dtype=torch.int32)
    token_seq = torch.tensor([i for i, n in enumerate(query_lens) for _ in range(n)], dtype=torch.int32)
    token_ctx = torch.tensor([c - n + j + 1 for n, c in zip(query_lens, context_lens) for j in range(n)],
                             dtype=torch.int32)
    out = gpu_attention.paged_attention(q.to(DEVICE), dev_cache, block_tables.to(DEVICE), token_seq.to(DEVICE),
                                           token_ctx.to(DEVICE), geo.head_dim ** -0.5, num_splits=splits)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().reshape(t, -1), expected, atol=tol, rtol=tol)
