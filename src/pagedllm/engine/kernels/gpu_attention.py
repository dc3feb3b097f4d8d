"""OpenAI Triton kernels for the paged KV cache (the GPU path): writing a step's keys and values into
their slots, and paged attention split over long contexts (flash-decoding: each split reduces its share
of the context to a running max, sum and weighted values; a second kernel merges the splits).

One attention kernel serves decode and prefill: every query token attends, through its sequence's
block table, to the first `context_len` positions of the cache (its causal prefix). Tested against
TorchPagedAttention on the CPU with TRITON_INTERPRET=1."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(kv_ptr, cache_ptr, slot_ptr, rows_per_head, D: tl.constexpr, ROWS: tl.constexpr):
    token = tl.program_id(0)
    row = tl.program_id(1)  # keys of head h are row h, values of head h are row KVH + h
    slot = tl.load(slot_ptr + token).to(tl.int64)  # int64 addresses: caches can pass 2**31 elements
    d = tl.arange(0, D)
    value = tl.load(kv_ptr + (token * ROWS + row) * D + d)
    tl.store(cache_ptr + (row * rows_per_head + slot) * D + d, value)


def write_kv(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv: [T, 2 * KVH, D] keys then values; kv_cache: [2, KVH, num_blocks, block_size, D]."""
    t, rows, d = kv.shape
    _, kvh, nb, bs, _ = kv_cache.shape
    _write_kv_kernel[(t, rows)](kv.contiguous(), kv_cache, slot_mapping, nb * bs, D=d, ROWS=rows)


@triton.jit
def _attention_split_kernel(q_ptr, cache_ptr, tables_ptr, token_seq_ptr, ctx_ptr, part_acc_ptr, part_ml_ptr,
                            scale, max_blocks, num_blocks, splits_blocks,
                            H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                            NUM_SPLITS: tl.constexpr):
    token, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // (H // KVH)
    seq = tl.load(token_seq_ptr + token)
    ctx = tl.load(ctx_ptr + token)
    d = tl.arange(0, D)
    offs = tl.arange(0, BS)
    q = tl.load(q_ptr + (token * H + head) * D + d).to(tl.float32)
    m = float("-inf")
    s = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    first = split * splits_blocks
    last = tl.minimum(first + splits_blocks, tl.cdiv(ctx, BS))
    key_base = (kv_head * num_blocks).to(tl.int64) * BS * D
    value_base = ((KVH + kv_head) * num_blocks).to(tl.int64) * BS * D
    for i in range(first, last):
        block = tl.load(tables_ptr + seq * max_blocks + i).to(tl.int64)
        pos = i * BS + offs
        valid = pos < ctx
        addr = (block * BS + offs)[:, None] * D + d[None, :]
        k = tl.load(cache_ptr + key_base + addr, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(cache_ptr + value_base + addr, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        correction = tl.exp(m - m_new)
        s = s * correction + tl.sum(p, axis=0)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    out = (token * H + head) * NUM_SPLITS + split
    tl.store(part_acc_ptr + out * D + d, acc)
    tl.store(part_ml_ptr + out * 2, m)
    tl.store(part_ml_ptr + out * 2 + 1, s)


@triton.jit
def _merge_splits_kernel(part_acc_ptr, part_ml_ptr, out_ptr, H: tl.constexpr, D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    token, head = tl.program_id(0), tl.program_id(1)
    base = (token * H + head) * NUM_SPLITS
    d = tl.arange(0, D)
    splits = tl.arange(0, NUM_SPLITS)
    m = tl.load(part_ml_ptr + (base + splits) * 2)
    s = tl.load(part_ml_ptr + (base + splits) * 2 + 1)
    acc = tl.load(part_acc_ptr + (base + splits)[:, None] * D + d[None, :])
    m_all = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)  # empty splits weigh nothing
    total = tl.sum(s * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + (token * H + head) * D + d, out.to(out_ptr.dtype.element_ty))


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, token_seq: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, num_splits: int = 4) -> torch.Tensor:
    """q: [T, H, D]; block_tables: [S, max_blocks] int32; token_seq: [T] row of block_tables per query
    token; context_lens: [T] positions each token sees (its own included). Returns [T, H, D]."""
    t, h, d = q.shape
    _, kvh, nb, bs, _ = kv_cache.shape
    max_blocks = block_tables.shape[1]
    num_splits = triton.next_power_of_2(max(1, min(num_splits, max_blocks)))
    splits_blocks = triton.cdiv(max_blocks, num_splits)
    part_acc = torch.empty(t, h, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(t, h, num_splits, 2, dtype=torch.float32, device=q.device)
    _attention_split_kernel[(t, h, num_splits)](
        q.contiguous(), kv_cache, block_tables, token_seq, context_lens, part_acc, part_ml, scale, max_blocks,
        nb, splits_blocks, H=h, KVH=kvh, D=d, BS=bs, NUM_SPLITS=num_splits)
    out = torch.empty_like(q)
    _merge_splits_kernel[(t, h)](part_acc, part_ml, out, H=h, D=d, NUM_SPLITS=num_splits)
    return out


class GpuPagedAttention:
    """TorchPagedAttention's interface over the kernels; reads `meta.kernel` (build_metadata(kernel_only=True))."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int = 4) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.num_splits = head_dim ** -0.5, num_splits

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta) -> torch.Tensor:
        k = meta.kernel
        write_kv(kv, kv_cache, k.slot_mapping)
        out = paged_attention(q, kv_cache, k.block_tables, k.token_seq, k.context_lens, self.scale, self.num_splits)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
