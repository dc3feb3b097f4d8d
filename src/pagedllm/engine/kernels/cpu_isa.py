"""The CPU tier: which build of pagedllm's kernels this machine runs, read from the CPU's features once.

Every choice that depends on the instruction set goes through here: which kernel build to load and with which
compiler flags, whether oneDNN's bf16 prepacking can run, which dtype "auto" means. The tier is the best one
the CPU can execute, or the one asked for (`cpu_isa` in engine.json, else the PAGEDLLM_CPU_ISA environment
variable), which may be any lower tier the CPU can still execute: that is how the AVX2 and portable paths are
tested and benchmarked on an AVX-512 machine. Every decision is a function of `CpuFeatures`, so the tests
feed it the feature sets of CPUs they do not run on.
"""
from __future__ import annotations

import enum
import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

ENV = "PAGEDLLM_CPU_ISA"


class CpuIsa(enum.StrEnum):
    """A build of the kernels (vec.h's PAGEDLLM_ISA_* macro), best first within its architecture."""

    AMX = "amx"  # avx512_bf16 plus AMX bf16 tiles: linears of many rows, prefill attention (Sapphire Rapids+)
    AVX512_BF16 = "avx512_bf16"  # AVX-512 F/BW/VL, BF16 and VNNI dot products (Zen 4+, Cooper Lake, Sapphire Rapids+)
    AVX512 = "avx512"  # AVX-512 F/BW/VL without BF16 (Skylake-SP to Ice Lake)
    AVX2 = "avx2"  # AVX2 + FMA + F16C (Haswell+, Zen 1-3)
    NEON_BF16 = "neon_bf16"  # aarch64 with BFDOT (Graviton 3/4, Neoverse V1/V2/N2)
    NEON = "neon"  # any aarch64 (Graviton 2, Ampere Altra)
    PORTABLE = "portable"  # plain C++, no intrinsics: compiles anywhere


@dataclass(frozen=True)
class TierSpec:
    arch: str | None  # the machine it runs on (platform.machine()); None: any
    needs: tuple[str, ...]  # CPU flags, as /proc/cpuinfo spells them
    cflags: tuple[str, ...]  # what the compiler is told beyond -O3
    bf16_math: str  # how bf16 weights meet activations, for the log


# VNNI: every CPU with AVX-512 BF16 has it; the int8 KV cache's integer dot products (vpdpwssd)
_AVX512_BF16_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_AVX512_BF16_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma")

TIERS: dict[CpuIsa, TierSpec] = {
    CpuIsa.AMX: TierSpec("x86_64", (*_AVX512_BF16_NEEDS, "amx_tile", "amx_bf16"),
                         (*_AVX512_BF16_FLAGS, "-mamx-tile", "-mamx-bf16"),
                         "bf16 dot products (vdpbf16ps); AMX tiles (tdpbf16ps) for prompts and decode batches from 8 "
                         "rows"),
    CpuIsa.AVX512_BF16: TierSpec("x86_64", _AVX512_BF16_NEEDS, _AVX512_BF16_FLAGS, "bf16 dot products (vdpbf16ps)"),
    CpuIsa.AVX512: TierSpec("x86_64", ("avx512f", "avx512bw", "avx512vl"),
                            ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"), "widened to fp32, fp32 FMA"),
    CpuIsa.AVX2: TierSpec("x86_64", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"),
                          "widened to fp32, fp32 FMA"),
    CpuIsa.NEON_BF16: TierSpec("aarch64", ("asimd", "bf16"), ("-march=armv8.2-a+bf16",), "bf16 dot products (bfdot)"),
    CpuIsa.NEON: TierSpec("aarch64", ("asimd",), ("-march=armv8-a",), "widened to fp32, fp32 FMA"),
    CpuIsa.PORTABLE: TierSpec(None, (), (), "widened to fp32, compiler-vectorized"),
}

# What torch's oneDNN needs for its prepacked bf16 linears (torch's mkldnn_bf16_device_check).
_ONEDNN_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",), ("amx_bf16",))


def _normalise_arch(machine: str) -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU says of itself: its architecture, its model name, its feature flags and its vendor (x86's
    vendor_id: AuthenticAMD, GenuineIntel)."""

    machine: str
    flags: frozenset[str]
    model: str = ""
    vendor: str = ""

    @classmethod
    def parse(cls, cpuinfo: str, machine: str) -> CpuFeatures:
        """From /proc/cpuinfo's text: x86 lists `flags`, aarch64 `Features` (asimd, bf16, i8mm, ...)."""
        flags: frozenset[str] = frozenset()
        model = vendor = ""
        for line in cpuinfo.splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("flags", "features") and not flags:
                flags = frozenset(value.split())
            elif key == "model name" and not model:
                model = value.strip()
            elif key == "vendor_id" and not vendor:
                vendor = value.strip()
        return cls(_normalise_arch(machine), flags, model, vendor)

    def has(self, *names: str) -> bool:
        return all(n in self.flags for n in names)


@functools.cache
def host() -> CpuFeatures:
    """This machine's features, read once."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so only the portable tier
        text = ""
    return CpuFeatures.parse(text, platform.machine())


def runnable(features: CpuFeatures) -> list[CpuIsa]:
    """The tiers this CPU can execute, best first; the portable one always."""
    return [isa for isa, spec in TIERS.items()
            if spec.arch in (None, features.machine) and features.has(*spec.needs)]


def choose(requested: str | None, features: CpuFeatures, field: str = "cpu_isa") -> CpuIsa:
    """The tier to run: the best this CPU can, or `requested` if it can execute that one. `field` is what the
    request came from, for the error."""
    tiers = runnable(features)
    if requested in (None, "", "auto"):
        return tiers[0]
    try:
        isa = CpuIsa(requested)
    except ValueError:
        raise ValueError(f"{field}: {requested!r} is not one of auto, {', '.join(i.value for i in CpuIsa)}") from None
    if isa not in tiers:
        spec = TIERS[isa]
        lacking = ([f"an {spec.arch} CPU"] if spec.arch not in (None, features.machine)
                   else [f for f in spec.needs if f not in features.flags])
        raise ValueError(f"{field}: {isa} needs {', '.join(lacking)}, which this CPU lacks; it runs "
                         f"{', '.join(t.value for t in tiers)} (or auto)")
    return isa


@dataclass(frozen=True)
class CpuPlan:
    """What the engine does on this CPU: the kernels' tier, and the choices that follow from it."""

    isa: CpuIsa
    features: CpuFeatures
    automatic: bool = True  # the best tier for this CPU, not one asked for by name

    @property
    def onednn_bf16(self) -> bool:
        """Whether oneDNN's prepacked bf16 linears can run: they need AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or
        AMX, and are not used below an AVX-512 tier (a forced avx2 run must not take an AVX-512 path)."""
        able = any(self.features.has(*need) for need in _ONEDNN_BF16)
        return able and self.isa in (CpuIsa.AMX, CpuIsa.AVX512_BF16, CpuIsa.AVX512)

    @property
    def non_temporal_weights(self) -> bool:
        """Whether the kernels fetch the packed weights non-temporally (kernels.h fetch_weights): on AMD's x86 CPUs,
        where the weights a step streams through then stay out of the L3 and Python's data stay in it (Zen 4,
        batch-1 decode: Python 98 against 132 us a step, the kernels level); not on Intel's, where the same made
        batch-1 decode 3.3x slower (Sapphire Rapids), nor where it was never measured."""
        return self._amd

    @property
    def fetches_kv_ahead(self) -> bool:
        """Whether decode attention fetches the KV blocks ahead by hand (kernels.h kFetchBlocks): on Intel's CPUs,
        where the hardware's prefetcher alone read a long context at half the speed (Sapphire Rapids); not on AMD's,
        where with the cache in huge pages batch-1 decode at 4,096 tokens ran 2-10% faster without (Zen 4)."""
        return not self._amd

    @property
    def _amd(self) -> bool:
        return self.features.machine == "x86_64" and self.features.vendor == "AuthenticAMD"

    def auto_dtype(self, kernels: bool) -> str:
        """dtype "auto": bf16 weights wherever the kernels run (half the bytes of float32 to read, widened in
        registers where the CPU has no bf16 arithmetic); without them, bf16 only where oneDNN computes it."""
        return "bfloat16" if kernels or self.onednn_bf16 else "float32"

    def describe(self) -> str:
        spec = TIERS[self.isa]
        extras = [f for f in spec.needs if f not in ("avx512f", "avx512bw", "avx512vl", "avx2", "asimd")]
        unused = [f for f in ("amx_bf16", "amx_tile", "i8mm") if f in self.features.flags and f not in spec.needs]
        detail = ", ".join(extras) + ("; " if extras and unused else "") + (
            f"{', '.join(unused)} present, unused" if unused else "")
        best = runnable(self.features)[0]
        forced = f", forced below {best}" if best != self.isa else ""
        fetch = ("; weights fetched non-temporally" if self.non_temporal_weights else "") + (
            ", KV blocks by the hardware" if not self.fetches_kv_ahead else "")
        return (f"CPU tier: {self.isa}{f' ({detail})' if detail else ''}{forced}; kernels: bf16 weights, "
                f"{spec.bf16_math}{fetch}")


def cflags(isa: CpuIsa) -> list[str]:
    return ["-O3", *TIERS[isa].cflags, f"-DPAGEDLLM_ISA_{isa.name}", "-fopenmp"]


def plan_for(config_value: str = "auto") -> CpuPlan:
    """This machine's plan: engine.json's `cpu_isa` when it names a tier, else PAGEDLLM_CPU_ISA, else the best
    tier. Raises ValueError naming whichever of the two asked for a tier this CPU cannot execute."""
    if config_value not in ("", "auto"):
        return _plan(config_value, "cpu_isa")
    return _plan(os.environ.get(ENV, "").strip().lower() or "auto", ENV)


@functools.cache
def _plan(requested: str, field: str) -> CpuPlan:
    features = host()
    return CpuPlan(choose(requested, features, field), features, automatic=requested == "auto")
