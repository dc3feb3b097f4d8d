"""The CPU fast path: pagedllm's C++ kernels (kernels/csrc/), built once per machine and CPU tier into the cache.

The engine runs its linear layers on packed bfloat16 or int8 weights and each step (decodes and prefill chunks)
as one C++ call for all decoder layers (norms, rotary embedding, KV write, paged attention, activation): at batch
1 the step is bound by reading the weights, not by Python per op. One source serves every tier (cpu_isa.py):
AVX-512 BF16 multiplies bf16 pairs directly, the others widen bf16 weights to float32 in registers. Where the
kernels cannot be built (no compiler) or `attention_backend: "torch"` is asked for, the plain-torch model runs
instead."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from pagedllm.engine import kv_quant
from pagedllm.engine.huge_pages import HugePageArena
from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.kernels.cpu_isa import CpuIsa
from pagedllm.errors import KernelsUnavailable

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "cpu_kernels.cpp"
HEADERS = (CSRC / "kernels.h", CSRC / "vec.h")


def source_tag() -> str:
    """Changes with the kernels' source, where it and torch live, and torch's version: a build is cached per tag and
    tier. The paths count because torch's build file names them: two checkouts sharing one folder rebuilt over each
    other's library (30 s each time the other ran), and the next run found it not as built."""
    where = f"{SOURCE.resolve()}\0{Path(torch.__file__).resolve()}\0{torch.__version__}"
    data = b"".join(p.read_bytes() for p in (SOURCE, *HEADERS)) + where.encode()
    return hashlib.sha256(data).hexdigest()[:12]


def default_isa() -> CpuIsa:
    """The tier this process runs: PAGEDLLM_CPU_ISA if set, else the best this CPU has that builds."""
    return buildable(cpu_isa.plan_for()).isa


def load(isa: CpuIsa | str | None = None) -> ModuleType:
    """The kernels compiled for `isa` (default: default_isa()); built on first use (about 30 s) and cached."""
    return _load(default_isa() if isa is None else CpuIsa(isa))


_failed: dict[CpuIsa, KernelsUnavailable] = {}  # a build that failed is not tried again in this process


@functools.cache
def _load(isa: CpuIsa) -> ModuleType:
    cpu_isa.choose(isa.value, cpu_isa.host())  # refuses a tier this CPU cannot execute
    if isa in _failed:
        raise _failed[isa]
    from pagedllm.cache import cache_dir
    try:
        return build(cache_dir() / "kernels" / f"{isa.value}-{source_tag()}", isa)
    except KernelsUnavailable as e:
        _failed[isa] = e
        raise


def build(directory: Path, isa: CpuIsa) -> ModuleType:
    """The kernels built into `directory` (a folder per source and tier), or loaded from it when the library
    there is exactly what an earlier build wrote."""
    from torch.utils.cpp_extension import load as compile_and_load

    from pagedllm.cache import build_lock, is_as_built, record_build
    name = f"pagedllm_cpu_kernels_{isa.value}"
    library = directory / f"{name}.so"
    with build_lock(directory), _environment_ninja():
        if library.exists() and not is_as_built(library):
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # torch's own build baton: a build killed midway leaves it, and every later build would wait on it
        # forever. Under our lock no other build runs, so one found here is always stale.
        (directory / "lock").unlink(missing_ok=True)
        building = not library.exists()
        if building:
            logger.info("building the CPU kernels for tier %s into %s (once per machine, about 30 s)", isa, directory)
        try:
            module = compile_and_load(name, [str(SOURCE)], extra_cflags=cpu_isa.cflags(isa),
                                      extra_ldflags=["-fopenmp"], build_directory=str(directory))
        except Exception as e:  # a missing compiler or ninja: say so once, and run plain torch
            raise KernelsUnavailable(f"building {SOURCE.name} for tier {isa} failed: {type(e).__name__}: {e}") from e
        if building:
            record_build(library)
    return module


@contextlib.contextmanager
def _environment_ninja() -> Iterator[None]:
    """torch runs the `ninja` first on PATH, which is this environment's only where the environment is active (the
    served engine) and may be the system's elsewhere. Ninja 1.12 changed how it hashes a build's command, so each
    of the two took the other's build for a stale one and built the kernels again (35 s, at every alternation):
    this environment's ninja (a dependency) always runs them."""
    import ninja
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def available(isa: CpuIsa | str | None = None) -> bool:
    try:
        load(isa)
        return True
    except KernelsUnavailable as e:
        logger.info("CPU kernels off: %s", e)
        return False


def buildable(plan: cpu_isa.CpuPlan) -> cpu_isa.CpuPlan:
    """`plan`, or, where its tier does not build here (a compiler too old for its flags, say), the best lower
    tier that does; `plan` itself if none does. Only for a tier chosen automatically: a forced one stays."""
    if not plan.automatic:
        return plan
    tiers = cpu_isa.runnable(plan.features)
    for isa in tiers[tiers.index(plan.isa):]:
        if available(isa):
            if isa != plan.isa:
                logger.warning("CPU kernels: tier %s did not build here; running tier %s", plan.isa, isa)
            return dataclasses.replace(plan, isa=isa)
    return plan


GROUP = 48  # output channels per packed group (kernels.h kGroupChannels): one sequential stream


def _padded_rows(n: int) -> int:
    return (n + GROUP - 1) // GROUP * GROUP


def _padded(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = weight.shape
    out = torch.zeros(_padded_rows(n), k, dtype=dtype)
    out[:n] = weight
    return out


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/48), K/2, 48, 2] bfloat16: per input pair (k, k+1), a group's 48 channels."""
    k = weight.shape[1]
    if k % 2:
        raise ValueError(f"pack_bf16: in_features {k} must be even")
    return _padded(weight, torch.bfloat16).view(-1, GROUP, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def to_kernel_layout(cache: torch.Tensor) -> torch.Tensor:
    """A layer's cache [2, KVH, blocks, BS, D], row-major within each block (the torch backend's), in the layout the
    kernels read and write (kernels.h kv_index): bf16 keys as K^T in pairs of dims, [D/2, BS, 2] per block, and
    values in pairs of positions, [BS/2, D, 2]; an int8 cache's codes likewise (its scales as they are); float32 as
    it is."""
    return _relaid(cache, _paired)


def from_kernel_layout(cache: torch.Tensor) -> torch.Tensor:
    """to_kernel_layout undone: the kernels' cache, row-major within each block."""
    return _relaid(cache, _unpaired)


def _relaid(cache: torch.Tensor, relay) -> torch.Tensor:
    if cache.dtype == torch.bfloat16:
        return relay(cache)
    out = cache.clone()
    if cache.dtype == torch.int8:
        kv_quant.split(out)[0].copy_(relay(kv_quant.split(cache)[0]))
    return out


def _paired(cache: torch.Tensor) -> torch.Tensor:
    two, kvh, blocks, bs, d = cache.shape
    keys = cache[0].reshape(kvh, blocks, bs, d // 2, 2).permute(0, 1, 3, 2, 4)
    values = cache[1].reshape(kvh, blocks, bs // 2, 2, d).permute(0, 1, 2, 4, 3)
    return torch.stack((keys.reshape(kvh, blocks, bs, d), values.reshape(kvh, blocks, bs, d)))


def _unpaired(cache: torch.Tensor) -> torch.Tensor:
    two, kvh, blocks, bs, d = cache.shape
    keys = cache[0].reshape(kvh, blocks, d // 2, bs, 2).permute(0, 1, 3, 2, 4)
    values = cache[1].reshape(kvh, blocks, bs // 2, d, 2).permute(0, 1, 2, 4, 3)
    return torch.stack((keys.reshape(kvh, blocks, bs, d), values.reshape(kvh, blocks, bs, d)))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes [N, K] int8, scale [N] float32), weight ~ codes * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> [ceil(N/48), K, 48]: per input feature, a group's 48 channels' codes."""
    return _padded(codes, torch.int8).view(-1, GROUP, codes.shape[1]).transpose(1, 2).contiguous()


def packed_nbytes(linear: nn.Linear, kind: str) -> int:
    return _padded_rows(linear.out_features) * linear.in_features * (1 if kind == "int8" else 2) + 64


class KernelLinear(nn.Module):
    """nn.Linear's drop-in on the kernels: "bf16" (packed), "int8" (packed codes, per-channel scales) or
    "plain" (other dtypes, through at::linear). `non_temporal`: the packed weights fetched so (CpuPlan
    non_temporal_weights)."""

    def __init__(self, linear: nn.Linear, kind: str, arena: HugePageArena | None = None,
                 ops: ModuleType | None = None, non_temporal: bool = False) -> None:
        super().__init__()
        ops = ops or load()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        w = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()
        scale = torch.empty(0)
        if kind == "bf16":
            w, bias = pack_bf16(w), None if bias is None else bias.float()
        elif kind == "int8":
            codes, scale = quantize_int8(w)
            w, bias = pack_int8(codes), None if bias is None else bias.float()
        elif kind != "plain":
            raise ValueError(f"kind: {kind!r} is not one of bf16, int8, plain")
        if arena is not None and kind != "plain":
            w = arena.place(w)
        self.arena = arena  # keeps the mapping alive as long as the weights in it
        self.op = ops.Linear(w, scale, bias, self.out_features, kind, non_temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.contiguous())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def linear_kind(dtype: torch.dtype, quantization: str | None) -> str:
    if quantization == "int8":
        return "int8"
    return "bf16" if dtype == torch.bfloat16 else "plain"


def swap_linears(model: nn.Module, kind: str, ops: ModuleType, non_temporal: bool = False) -> None:
    """Replace every nn.Linear of `model` by a KernelLinear of `kind` on `ops` (one tier's build), the packed
    weights in one arena."""
    targets = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if isinstance(child, nn.Linear)]
    arena = HugePageArena(sum(packed_nbytes(child, kind) for _, _, child in targets)) if kind != "plain" else None
    for module, name, child in targets:
        setattr(module, name, KernelLinear(child, kind, arena, ops, non_temporal))
