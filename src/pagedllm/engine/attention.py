"""Attention over the paged KV cache, in plain torch (the CPU path and the reference for GPU kernels).

Cache layout per layer: [2 (key, value), num_kv_heads, num_blocks, block_size, head_dim], head-major so
one `index_select` over (key/value, head, block) rows gathers a batch's whole context straight into
the shape `bmm` wants, and one `index_copy_` writes a step's new keys and values. An int8 cache (kv_quant.py)
has each block's scales after its codes and is dequantized as it is gathered.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.engine import kv_quant


@dataclass
class QueryGroup:
    """Sequences attended together, as the model runner lays them out: `num_seqs` sequences of `query_len`
    new tokens each, from `query_start` in the flat batch, with their block tables and context lengths
    (positions each sequence's last token sees, itself included)."""

    query_start: int
    num_seqs: int
    query_len: int
    block_tables: list[list[int]]
    context_lens: list[int]
    # Prompt tokens (or a preempted sequence's recompute), however few: the CPU kernels attend them in prefill tiles,
    # so a prompt's last token gets the same result whether it came with its prompt or after a prefix-cache hit.
    prefill: bool = False


@dataclass
class AttentionGroup:
    """Sequences attended together: `num_seqs` sequences of `query_len` new tokens each, laid out
    contiguously from `query_start` in the flat batch; their context is gathered by `gather_index`."""

    query_start: int
    num_seqs: int
    query_len: int
    gather_index: torch.Tensor  # [2 * num_kv_heads * num_seqs * max_blocks] rows of the (kv, head, block) view
    bias: torch.Tensor  # [num_kv_heads * num_seqs, query_len * group, context_len_padded]: 0 or -inf


@dataclass
class KernelMetadataLists:
    """What the kernels read, as the runner lays a step out: per query token its cache slot, sequence and context
    length; per sequence its block table (unpadded) and whether its tokens are prompt tokens. The CPU kernels' step
    takes these lists as they are (LlamaForCausalLM.forward_step); kernel_metadata packs them into tensors."""

    slot_mapping: list[int]
    block_tables: list[list[int]]
    token_seq: list[int]
    context_lens: list[int]  # positions the token sees, itself included
    prefill_seqs: list[int]  # 1 or 0 per sequence (QueryGroup.prefill)


@dataclass
class KernelMetadata:
    """KernelMetadataLists as tensors, what the Triton kernels and the CPU kernels' single ops read."""

    slot_mapping: torch.Tensor  # [num_tokens] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    token_seq: torch.Tensor  # [num_tokens] int32
    context_lens: torch.Tensor  # [num_tokens] int32: positions the token sees, itself included
    prefill_seqs: torch.Tensor  # [num_seqs] int32, 1 or 0: whose tokens are prompt tokens (QueryGroup.prefill)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    write_index: torch.Tensor  # [2 * num_kv_heads * num_tokens] rows of the (kv, head, slot) view
    groups: list[AttentionGroup]
    kernel: KernelMetadata | None = None  # set, and groups left empty, for the triton backend


@dataclass
class CacheGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    int8: bool = False  # kv_cache_dtype "int8": codes and scales (kv_quant.py)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.int8:
            return kv_quant.cache_shape(self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)
        return (2, self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim)


def build_metadata(
    slot_mapping: list[int],
    groups: list[QueryGroup],
    geo: CacheGeometry,
    dtype: torch.dtype,
    device: torch.device,
    kernel_only: bool = False,
) -> AttentionMetadata:
    """Torch attention's metadata, or with `kernel_only` (the backend's: Backend.kernel_metadata_only)
    only the kernels'."""
    if kernel_only:
        empty = _no_index(device)
        return AttentionMetadata(empty, empty, [], kernel_metadata(slot_mapping, groups, device))
    slots = torch.tensor(slot_mapping, dtype=torch.long, device=device)
    rows = torch.arange(2 * geo.num_kv_heads, device=device)[:, None]
    write_index = (rows * (geo.num_blocks * geo.block_size) + slots[None, :]).reshape(-1)
    built = [_group(g, rows, geo, dtype, device) for g in groups]
    return AttentionMetadata(slots, write_index, built)


@functools.cache
def _no_index(device: torch.device) -> torch.Tensor:
    """The torch path's index tensors where the kernels need none, made once rather than at every step."""
    return torch.empty(0, dtype=torch.long, device=device)


def kernel_metadata_lists(slot_mapping: list[int], groups: list[QueryGroup]) -> KernelMetadataLists:
    k = KernelMetadataLists(slot_mapping, [], [], [], [])
    for g in groups:  # tokens are laid out sequence by sequence
        for table, ctx in zip(g.block_tables, g.context_lens):
            k.token_seq += [len(k.block_tables)] * g.query_len
            k.context_lens += range(ctx - g.query_len + 1, ctx + 1)
            k.block_tables.append(table)
            k.prefill_seqs.append(int(g.prefill))
    return k


def kernel_metadata(slot_mapping: list[int], groups: list[QueryGroup], device: torch.device) -> KernelMetadata:
    k = kernel_metadata_lists(slot_mapping, groups)
    width, tokens, seqs = max(len(t) for t in k.block_tables), len(slot_mapping), len(k.block_tables)
    flat = slot_mapping + k.token_seq + k.context_lens + k.prefill_seqs
    for table in k.block_tables:
        flat += table
        flat += [0] * (width - len(table))
    slots, seq_of_token, lens, prefills, padded = packed(flat, [tokens, tokens, tokens, seqs, seqs * width],
                                                         np.int32, device)
    return KernelMetadata(slots, padded.view(seqs, width), seq_of_token, lens, prefills)


def packed(values: list[int], sizes: list[int], dtype: type, device: torch.device) -> tuple[torch.Tensor, ...]:
    """`values` as one tensor of numpy's `dtype`, cut into views of `sizes`: a step's inputs in one conversion, not
    one per field (torch.tensor takes 3 us a call, numpy and from_numpy 1.4 us)."""
    tensor = torch.from_numpy(np.array(values, dtype=dtype))
    return (tensor if device.type == "cpu" else tensor.to(device)).split_with_sizes(sizes)


def _group(g: QueryGroup, rows: torch.Tensor, geo: CacheGeometry, dtype: torch.dtype,
           device: torch.device) -> AttentionGroup:
    query_len, num_seqs = g.query_len, g.num_seqs
    max_blocks = max(len(t) for t in g.block_tables)
    padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in g.block_tables], dtype=torch.long, device=device)
    gather_index = (rows * geo.num_blocks + padded.reshape(1, -1)).reshape(-1)
    key_pos = torch.arange(max_blocks * geo.block_size, device=device)
    ctx = torch.tensor(g.context_lens, device=device)[:, None, None]
    query_pos = ctx - query_len + torch.arange(query_len, device=device)[None, :, None]
    allowed = key_pos[None, None, :] <= query_pos  # causal; also hides padding beyond the context
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    group = geo.num_heads // geo.num_kv_heads
    bias = bias[None, :, :, None, :].expand(geo.num_kv_heads, -1, -1, group, -1)
    bias = bias.reshape(geo.num_kv_heads * num_seqs, query_len * group, -1)
    return AttentionGroup(g.query_start, num_seqs, query_len, gather_index, bias)


class TorchPagedAttention:
    """The seam for GPU kernels: `write_kv` then attention per group, over a flat batch."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # The dtype of the score and value products; None: the cache's. float32 on CPUs without bf16 matmul,
        # where torch's bf16 bmm fell to a reference loop (a 512-token prompt: 3.1 of 4.3 s in bmm on AVX2).
        self.compute_dtype: torch.dtype | None = None

    def write_kv(self, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> None:
        """kv: [T, 2 * KVH, D], keys then values."""
        if kv_cache.dtype == torch.int8:
            codes, scales = kv_quant.split(kv_cache)
            new_codes, new_scales = kv_quant.quantize(kv)
            bs, rows = kv_cache.shape[3], torch.arange(2 * self.num_kv_heads, device=kv.device)[None, :]
            slots = meta.slot_mapping[:, None]
            at = (rows // self.num_kv_heads, rows % self.num_kv_heads, slots // bs, slots % bs)
            codes.index_put_(at, new_codes)
            scales.index_put_(at, new_scales)
            return
        kv_cache.view(-1, self.head_dim).index_copy_(0, meta.write_index, kv.transpose(0, 1).reshape(-1, self.head_dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; kv: [T, 2 * KVH, D] for the new tokens. Returns [T, H * D]."""
        self.write_kv(kv, kv_cache, meta)
        outs = [self._attend_group(q, kv_cache, g) for g in meta.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _attend_group(self, q: torch.Tensor, kv_cache: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        kvh, d, b, n = self.num_kv_heads, self.head_dim, g.num_seqs, g.query_len
        group = self.num_heads // kvh
        dtype = self.compute_dtype or q.dtype
        bs = kv_cache.shape[3]
        if kv_cache.dtype == torch.int8:
            blocks = kv_cache.view(-1, bs * kv_cache.shape[4]).index_select(0, g.gather_index)
            rows = kv_quant.dequantize_rows(blocks, bs).to(dtype)
        else:
            rows = kv_cache.view(-1, bs * d).index_select(0, g.gather_index).to(dtype)
        keys, values = rows.view(2, kvh * b, -1, d).unbind(0)
        qg = q[g.query_start:g.query_start + b * n].view(b, n, kvh, group, d)
        qg = qg.permute(2, 0, 1, 3, 4).reshape(kvh * b, n * group, d).to(dtype)
        scores = torch.baddbmm(g.bias.to(dtype), qg, keys.transpose(1, 2), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        out = torch.bmm(probs, values).view(kvh, b, n, group, d).to(q.dtype)
        return out.permute(1, 2, 0, 3, 4).reshape(b * n, self.num_heads * d)
