"""huge_pages.py: slices of one mapping advised for transparent huge pages, zeroed, aligned and bounded; the packed
weights and, on the CPU, the KV cache live in them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.huge_pages import HugePageArena
from pagedllm.engine.llm_engine import LLMEngine


def _thp_eligible(address: int) -> bool | None:
    """Whether the kernel would back the mapping holding `address` with huge pages (smaps' THPeligible), or None
    where smaps does not say."""
    region = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            region = start <= address < end
        elif region and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None


def test_slices_are_zeroed_aligned_typed_and_bounded():
    arena = HugePageArena(HugePageArena.nbytes((3, 5), torch.bfloat16) + HugePageArena.nbytes((7,), torch.int32))
    a = arena.take((3, 5), torch.bfloat16)
    b = arena.place(torch.arange(7, dtype=torch.int32))
    assert a.shape == (3, 5) and a.dtype == torch.bfloat16 and not a.any()
    assert b.tolist() == list(range(7))
    assert b.data_ptr() % 64 == 0 and b.data_ptr() - a.data_ptr() == 64
    with pytest.raises(ValueError, match="do not fit"):
        arena.take((1,), torch.int8)


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
huge_pages_on = pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                                   reason="no transparent huge pages on this machine")


@huge_pages_on
def test_the_mapping_is_advised_for_huge_pages():
    arena = HugePageArena(8 << 20)
    assert _thp_eligible(arena.take((1,), torch.int8).data_ptr()) is not False


@huge_pages_on
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_the_engines_kv_cache_is_in_huge_pages_on_the_cpu(tiny_model_dir, kv_cache_dtype):
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir("llama3")), kv_cache_dtype=kv_cache_dtype,
                                    kv_cache_memory=4 << 20))
    caches = engine.runner.kv_caches
    assert len({c.untyped_storage().data_ptr() for c in caches}) == 1  # slices of the one mapping
    for cache in caches:
        assert cache.shape == engine.runner.geometry.shape and not cache.any()
        assert _thp_eligible(cache.data_ptr()) is not False
