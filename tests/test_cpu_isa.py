"""The CPU tier (kernels/cpu_isa.py): chosen from the CPU's features, for the CPUs of every family this suite
does not run on (their feature sets faked), and the kernels' core built and checked on every tier: natively for
the x86 tiers this CPU executes, cross-compiled and run under qemu for Arm."""
from __future__ import annotations

import logging
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from pagedllm import LLM
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.kernels import cpu as cpu_kernels
from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.kernels.cpu_isa import CpuFeatures, CpuIsa, CpuPlan
from tests.support.kernel_tiers import RUNNABLE

X86_BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx"
AMD, INTEL = "AuthenticAMD", "GenuineIntel"
CPUS = {  # /proc/cpuinfo flags and vendor_id of CPUs seen in the field (trimmed to what matters)
    "zen3": ("x86_64", X86_BASE + " avx2 fma f16c bmi2", AMD),
    "skylake-sp": ("x86_64", X86_BASE + " avx2 fma f16c avx512f avx512dq avx512cd avx512bw avx512vl", INTEL),
    "zen4": ("x86_64", X86_BASE + " avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni", AMD),
    "sapphire-rapids": ("x86_64", X86_BASE + " avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_bf16 "
                                             "avx512_vnni amx_bf16 amx_tile amx_int8 avx_ne_convert", INTEL),
    "atom": ("x86_64", "fpu sse sse2 ssse3 sse4_1 sse4_2", INTEL),
    "graviton2": ("aarch64", "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimdrdm asimddp", ""),
    "graviton3": ("aarch64", "fp asimd evtstrm aes atomics asimddp sve i8mm bf16 svebf16", ""),
    "riscv": ("riscv64", "", ""),
}


def features(name: str) -> CpuFeatures:
    machine, flags, vendor = CPUS[name]
    return CpuFeatures(machine, frozenset(flags.split()), vendor=vendor)


@pytest.mark.parametrize("cpu,best,runnable", [
    ("zen3", "avx2", ["avx2", "portable"]),
    ("skylake-sp", "avx512", ["avx512", "avx2", "portable"]),
    ("zen4", "avx512_bf16", ["avx512_bf16", "avx512", "avx2", "portable"]),
    ("sapphire-rapids", "amx", ["amx", "avx512_bf16", "avx512", "avx2", "portable"]),
    ("atom", "portable", ["portable"]),
    ("graviton2", "neon", ["neon", "portable"]),
    ("graviton3", "neon_bf16", ["neon_bf16", "neon", "portable"]),
    ("riscv", "portable", ["portable"]),
])
def test_each_cpu_gets_its_best_tier_and_can_run_every_lower_one(cpu, best, runnable):
    f = features(cpu)
    assert cpu_isa.choose("auto", f) == CpuIsa(best)
    assert [t.value for t in cpu_isa.runnable(f)] == runnable
    for lower in runnable:
        assert cpu_isa.choose(lower, f) == CpuIsa(lower)


def test_a_tier_above_the_cpu_is_refused_naming_what_it_lacks():
    with pytest.raises(ValueError, match=r"cpu_isa: avx512 needs avx512f, avx512bw, avx512vl, which this CPU lacks; "
                                         r"it runs avx2, portable"):
        cpu_isa.choose("avx512", features("zen3"))
    with pytest.raises(ValueError, match="cpu_isa: neon needs an aarch64 CPU"):
        cpu_isa.choose("neon", features("zen4"))
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_ISA: 'avx1024' is not one of auto, amx, avx512_bf16"):
        cpu_isa.choose("avx1024", features("zen4"), field="PAGEDLLM_CPU_ISA")


def test_the_log_line_names_the_tier_and_how_bf16_is_computed():
    assert CpuPlan(CpuIsa.AVX2, features("zen3")).describe() == (
        "CPU tier: avx2 (fma, f16c); kernels: bf16 weights, widened to fp32, fp32 FMA; weights fetched "
        "non-temporally, KV blocks by the hardware")
    assert CpuPlan(CpuIsa.AMX, features("sapphire-rapids")).describe() == (
        "CPU tier: amx (avx512_bf16, avx512_vnni, amx_tile, amx_bf16); kernels: bf16 weights, bf16 dot products "
        "(vdpbf16ps); AMX tiles (tdpbf16ps) for prompts and decode batches from 8 rows")
    assert CpuPlan(CpuIsa.AVX512_BF16, features("sapphire-rapids")).describe() == (
        "CPU tier: avx512_bf16 (avx512_bf16, avx512_vnni; amx_bf16, amx_tile present, unused), forced below amx; "
        "kernels: bf16 weights, bf16 dot products (vdpbf16ps)")
    assert CpuPlan(CpuIsa.AVX2, features("zen4")).describe().startswith("CPU tier: avx2 (fma, f16c), forced below "
                                                                        "avx512_bf16")
    assert "bfdot" in CpuPlan(CpuIsa.NEON_BF16, features("graviton3")).describe()


def test_onednn_bf16_and_dtype_auto_follow_the_tier():
    """oneDNN's bf16 prepacking is what crashed the engine on Zen 3: never below an AVX-512 tier, even on a CPU
    that has it (a forced avx2 run must take the avx2 machine's path)."""
    assert not CpuPlan(CpuIsa.AVX2, features("zen3")).onednn_bf16
    assert CpuPlan(CpuIsa.AVX512_BF16, features("zen4")).onednn_bf16
    assert CpuPlan(CpuIsa.AVX512, features("skylake-sp")).onednn_bf16
    assert not CpuPlan(CpuIsa.AVX2, features("zen4")).onednn_bf16
    assert not CpuPlan(CpuIsa.NEON_BF16, features("graviton3")).onednn_bf16
    assert CpuPlan(CpuIsa.AVX2, features("zen3")).auto_dtype(kernels=True) == "bfloat16"
    assert CpuPlan(CpuIsa.AVX2, features("zen3")).auto_dtype(kernels=False) == "float32"
    assert CpuPlan(CpuIsa.AVX512_BF16, features("zen4")).auto_dtype(kernels=False) == "bfloat16"


@pytest.mark.parametrize("cpu", CPUS)
def test_amd_fetches_weights_non_temporally_and_leaves_kv_blocks_to_the_hardware(cpu):
    """Both measured faster on Zen 4, and the first 3.3x slower on Sapphire Rapids, whose prefetcher alone read a
    long context at half the speed (cpu_isa.py); whatever tier runs, forced lower ones included."""
    f = features(cpu)
    for isa in cpu_isa.runnable(f):
        plan = CpuPlan(isa, f)
        assert plan.non_temporal_weights == (cpu in ("zen3", "zen4")) != plan.fetches_kv_ahead


def test_a_tier_that_does_not_build_falls_to_the_next_only_when_chosen_automatically(monkeypatch):
    """An older compiler without -mavx512bf16, say: the engine still starts, on the best tier that builds."""
    monkeypatch.setattr(cpu_kernels, "available", lambda isa=None: CpuIsa(isa) not in (CpuIsa.AVX512_BF16,
                                                                                        CpuIsa.AVX512))
    zen4 = features("zen4")
    assert cpu_kernels.buildable(CpuPlan(CpuIsa.AVX512_BF16, zen4)).isa == CpuIsa.AVX2
    forced = CpuPlan(CpuIsa.AVX512, zen4, automatic=False)
    assert cpu_kernels.buildable(forced) == forced  # then the engine says so and runs plain torch
    monkeypatch.setattr(cpu_kernels, "available", lambda isa=None: False)
    assert cpu_kernels.buildable(CpuPlan(CpuIsa.AVX2, features("zen3"))).isa == CpuIsa.AVX2


def test_cpuinfo_is_parsed_on_both_architectures():
    x86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma f16c\n\n"
           "processor\t: 1\nflags : x\n")
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert CpuFeatures.parse(x86, "x86_64") == CpuFeatures("x86_64", frozenset({"fpu", "avx2", "fma", "f16c"}),
                                                           "AMD EPYC 7B13", "AuthenticAMD")
    assert cpu_isa.choose("auto", CpuFeatures.parse(arm, "arm64")) == CpuIsa.NEON_BF16
    assert cpu_isa.choose("auto", CpuFeatures.parse("", "x86_64")) == CpuIsa.PORTABLE


def test_each_tier_is_built_with_its_own_flags():
    assert cpu_isa.cflags(CpuIsa.AVX2) == ["-O3", "-mavx2", "-mfma", "-mf16c", "-DPAGEDLLM_ISA_AVX2", "-fopenmp"]
    assert cpu_isa.cflags(CpuIsa.PORTABLE) == ["-O3", "-DPAGEDLLM_ISA_PORTABLE", "-fopenmp"]
    assert "-march=armv8.2-a+bf16" in cpu_isa.cflags(CpuIsa.NEON_BF16)


def test_the_environment_variable_and_engine_json_pick_the_tier(monkeypatch):
    monkeypatch.setenv(cpu_isa.ENV, "portable")
    assert cpu_isa.plan_for().isa == CpuIsa.PORTABLE
    assert cpu_isa.plan_for(RUNNABLE[0].value).isa == RUNNABLE[0]  # engine.json's field wins
    monkeypatch.setenv(cpu_isa.ENV, "avx1024")
    with pytest.raises(ValueError, match="PAGEDLLM_CPU_ISA: 'avx1024'"):
        cpu_isa.plan_for()
    with pytest.raises(ValueError, match="cpu_isa: 'sse9' is not one of auto"):
        EngineConfig(cpu_isa="sse9")


def test_the_engine_refuses_a_tier_this_cpu_cannot_run(tiny_model_dir):
    foreign = "neon" if cpu_isa.host().machine != "aarch64" else "avx2"
    with pytest.raises(ValueError, match=f"cpu_isa: {foreign} needs"):
        LLM(str(tiny_model_dir("llama-tied")), cpu_isa=foreign)


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_the_engine_runs_the_tier_asked_for_and_logs_it(tiny_model_dir, isa, caplog):
    from tests.support.kernel_tiers import ops_for
    ops_for(isa)
    with caplog.at_level(logging.INFO, logger="pagedllm.engine.llm_engine"):
        llm = LLM(str(tiny_model_dir("llama-tied")), cpu_isa=isa.value, num_kv_blocks=16)
    assert llm.engine.runner.model.cpu_isa == isa.value
    assert f"CPU tier: {isa}" in caplog.text and "bf16 linears" in caplog.text


# ---- the kernels' core alone: native x86 tiers, and aarch64 under qemu ----------------------------------------
# Every compile below starts at once, two at a time (this machine has two cores), when the first of these tests
# asks; each test then waits for its own.
SELFTEST = cpu_kernels.CSRC / "kernels_selftest.cpp"
ARM_COMPILER, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
ARM_TOOLS = cpu_isa.host().machine != "aarch64" and bool(ARM_COMPILER and QEMU)
needs_arm_tools = pytest.mark.skipif(
    not ARM_TOOLS, reason="needs Debian's g++-aarch64-linux-gnu and qemu-user (make setup installs them as root)")


def _compile(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _arm_binding_command() -> list[str]:
    """cpu_kernels.cpp (the tensors, decode_layers) for aarch64 against torch's headers: compile only, since this
    torch is an x86 build."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]
    return [ARM_COMPILER, "-std=c++17", *cpu_isa.cflags(CpuIsa.NEON_BF16), *includes,
            "-DTORCH_EXTENSION_NAME=pagedllm_cpu_kernels_neon_bf16", "-c", str(cpu_kernels.SOURCE), "-o", "/dev/null"]


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftests")
    jobs = {isa: ["g++", "-std=c++17", *cpu_isa.cflags(isa), str(SELFTEST), "-o", str(out / isa.value)]
            for isa in RUNNABLE}
    if ARM_TOOLS:
        jobs["arm binding"] = _arm_binding_command()  # the longest first
        jobs = {"arm binding": jobs.pop("arm binding"), **jobs}
        for isa in (CpuIsa.NEON, CpuIsa.NEON_BF16):
            jobs[isa] = [ARM_COMPILER, "-std=c++17", *cpu_isa.cflags(isa), "-static", str(SELFTEST), "-o",
                         str(out / isa.value)]
    pool = ThreadPoolExecutor(2)
    futures = {name: pool.submit(_compile, cmd) for name, cmd in jobs.items()}
    yield lambda name: (futures[name].result(), out / getattr(name, "value", "binding"))
    pool.shutdown()


def _built(compiles, name):
    result, binary = compiles(name)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(binary)


@pytest.mark.parametrize("isa", RUNNABLE, ids=str)
def test_kernel_core_selftest_native(compiles, isa):
    run = subprocess.run([_built(compiles, isa)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert f"kernels_selftest {isa}:" in run.stdout


@needs_arm_tools
@pytest.mark.parametrize("isa", [CpuIsa.NEON, CpuIsa.NEON_BF16], ids=str)
def test_kernel_core_selftest_on_aarch64_under_qemu(compiles, isa):
    run = subprocess.run([QEMU, "-cpu", "max", _built(compiles, isa)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert f"kernels_selftest {isa}:" in run.stdout


@needs_arm_tools
def test_torch_binding_compiles_for_aarch64(compiles):
    _built(compiles, "arm binding")
