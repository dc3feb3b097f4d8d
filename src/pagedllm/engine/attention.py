"""Attention over the paged KV cache, in plain torch (the CPU path and the reference for GPU kernels).

Cache layout per layer: [num_kv_heads, num_blocks, block_size, head_dim], head-major so one
`index_select` over (head, block) rows gathers a batch's context straight into the shape `bmm` wants.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionGroup:
    """Sequences attended together: `num_seqs` sequences of `query_len` new tokens each, laid out
    contiguously from `query_start` in the flat batch; their context is gathered by `gather_index`."""

    query_start: int
    num_seqs: int
    query_len: int
    gather_index: torch.Tensor  # [num_kv_heads * num_seqs * max_blocks] rows of the (head, block) view
    bias: torch.Tensor  # [num_seqs, query_len, context_len_padded] float32, 0 or -inf


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token
    write_index: torch.Tensor  # [num_kv_heads * num_tokens] rows of the (head, slot) view
    groups: list[AttentionGroup]


def kv_cache_shape(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    return (num_kv_heads, num_blocks, block_size, head_dim)


def build_metadata(
    slot_mapping: list[int],
    groups: list[tuple[int, int, int, list[list[int]], list[int]]],
    num_kv_heads: int,
    num_blocks: int,
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """`groups`: (query_start, num_seqs, query_len, block_tables, context_lens) for each group."""
    slots = torch.tensor(slot_mapping, dtype=torch.long, device=device)
    heads = torch.arange(num_kv_heads, device=device)[:, None]
    write_index = (heads * (num_blocks * block_size) + slots[None, :]).reshape(-1)
    built = [_group(*g, heads=heads, num_blocks=num_blocks, block_size=block_size, device=device) for g in groups]
    return AttentionMetadata(slots, write_index, built)


def _group(query_start: int, num_seqs: int, query_len: int, block_tables: list[list[int]],
           context_lens: list[int], *, heads: torch.Tensor, num_blocks: int, block_size: int,
           device: torch.device) -> AttentionGroup:
    max_blocks = max(len(t) for t in block_tables)
    padded = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.long, device=device)
    gather_index = (heads * num_blocks + padded.reshape(1, -1)).reshape(-1)
    key_pos = torch.arange(max_blocks * block_size, device=device)
    ctx = torch.tensor(context_lens, device=device)[:, None, None]
    query_pos = ctx - query_len + torch.arange(query_len, device=device)[None, :, None]
    allowed = key_pos[None, None, :] <= query_pos  # causal; also hides padding beyond the context
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
    return AttentionGroup(query_start, num_seqs, query_len, gather_index, bias)


class TorchPagedAttention:
    """The seam for GPU kernels: `write_kv` then `attend`, over a flat batch described by metadata."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        for new, cache in ((k, k_cache), (v, v_cache)):
            flat = cache.view(-1, self.head_dim)
            flat.index_copy_(0, meta.write_index, new.transpose(0, 1).reshape(-1, self.head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] for the new tokens. Returns [T, H * D]."""
        self.write_kv(k, v, k_cache, v_cache, meta)
        outs = [self._attend_group(q, k_cache, v_cache, g) for g in meta.groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _attend_group(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      g: AttentionGroup) -> torch.Tensor:
        kvh, d, b, n = self.num_kv_heads, self.head_dim, g.num_seqs, g.query_len
        group = self.num_heads // kvh
        length = g.bias.shape[-1]
        rows = k_cache.view(-1, k_cache.shape[2] * d)
        keys = rows.index_select(0, g.gather_index).view(kvh * b, length, d)
        values = v_cache.view(-1, k_cache.shape[2] * d).index_select(0, g.gather_index).view(kvh * b, length, d)
        qg = q[g.query_start:g.query_start + b * n].view(b, n, kvh, group, d)
        qg = qg.permute(2, 0, 1, 3, 4).reshape(kvh * b, n * group, d)
        scores = torch.bmm(qg, keys.transpose(1, 2)).view(kvh, b, n, group, length).float()
        scores = scores * self.scale + g.bias.view(1, b, n, 1, length)
        probs = scores.softmax(dim=-1).to(q.dtype).view(kvh * b, n * group, length)
        out = torch.bmm(probs, values).view(kvh, b, n, group, d)
        return out.permute(1, 2, 0, 3, 4).reshape(b * n, self.num_heads * d)
