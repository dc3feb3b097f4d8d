"""The int8 KV cache (`kv_cache_dtype: "int8"`): keys and values kept as int8 codes with a bfloat16 scale per
position and KV head, quantized as a step writes them and read back inside attention; this module is the definition
the kernels (kernels.h write_codes, attend_codes) and the tests follow.

A layer's cache is one int8 tensor [2, KVH, blocks, block_size, head_dim + 2]: each block holds its positions'
codes (block_size * head_dim bytes; row-major for the torch backend, in the CPU kernels' pairs for them), then their
scales (block_size bfloat16). A position costs head_dim + 2 bytes per KV head against 2 * head_dim in bfloat16:
1.94x the tokens in the same memory at head_dim 64, 1.97x at 128. A scale per position (rather than per block)
never changes once written, so a block is never quantized twice as it fills, and it measured the smaller key and
value errors and the perplexity nearer the unquantized cache's (perf/bench_kv_cache.py).
"""
from __future__ import annotations

import torch

SCALE_BYTES = 2  # a bfloat16 scale per position and KV head
MIN_SCALE = 2.0 ** -126  # an all-zero row's scale (a bfloat16 too)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (codes int8 [..., head_dim], scales bfloat16 [...]): each row's scale its largest |x| / 127
    rounded up to bfloat16 (so no code clips), each code x / scale rounded to nearest even, in float32."""
    xf = x.float()
    bits = (xf.abs().amax(dim=-1) / 127).view(torch.int32)
    scales = ((bits + 0xFFFF) & -0x10000).view(torch.float32).clamp(min=MIN_SCALE)
    codes = torch.round(xf / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scales.to(torch.bfloat16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 codes * scales (exact: 8 significant bits each)."""
    return codes.float() * scales.float()[..., None]


def cache_shape(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int) -> tuple[int, ...]:
    return (2, num_kv_heads, num_blocks, block_size, head_dim + SCALE_BYTES)


def split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a layer's int8 cache: its codes [2, KVH, blocks, block_size, head_dim] (in whatever layout they
    were written) and scales [2, KVH, blocks, block_size] bfloat16."""
    two, kvh, blocks, bs, row = cache.shape
    d = row - SCALE_BYTES
    flat = cache.view(two, kvh, blocks, bs * row)
    return flat[..., :bs * d].view(two, kvh, blocks, bs, d), flat[..., bs * d:].view(torch.bfloat16)


def dequantize_rows(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Whole blocks of an int8 cache, [n, block_size * (head_dim + 2)] (one KV head's block each), as float32
    [n, block_size * head_dim]."""
    d = rows.shape[1] // block_size - SCALE_BYTES
    codes = rows[:, :block_size * d].view(-1, block_size, d)
    scales = rows[:, block_size * d:].view(torch.bfloat16)
    return dequantize(codes, scales).view(-1, block_size * d)
