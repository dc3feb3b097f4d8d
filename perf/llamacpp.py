"""llama.cpp, the CPU peer: built once into the cache from the source vendored in the llama-cpp-python
sdist, the embedded model converted to GGUF (BF16 and Q8_0) with its own converter, and its benchmark
tools run with JSON output. Nothing here is imported by pagedllm itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from pagedllm.cache import cache_dir
from pagedllm.engine.kernels import cpu_isa
from pagedllm.weights import ensure_default_model

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp 0c1e57098
TARGETS = ("llama-bench", "llama-batched-bench", "llama-perplexity")
CONVERTER_PACKAGES = ("torch==2.13.0", "numpy<2", "transformers", "sentencepiece", "protobuf", "safetensors")


def home() -> Path:
    return cache_dir() / "llamacpp"


def _run(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def source() -> Path:
    found = sorted(home().glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[0]
    home().mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp: downloading the {SDIST} sdist", file=sys.stderr)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(home())])
    with tarfile.open(next(home().glob("llama_cpp_python-*.tar.gz"))) as tar:
        tar.extractall(home(), filter="data")
    return source()


# Builds by CPU tier: "native" is what this CPU has; "avx2" is llama.cpp's AVX2 + FMA + F16C build with every
# AVX-512 and AMX option off, the peer of pagedllm's forced avx2 tier on an AVX-512 machine; "avx512" adds
# AVX-512F/BW/VL/DQ without its BF16, VNNI and VBMI extensions (Skylake-SP), the peer of the avx512 tier.
_AVX512_EXTENSIONS_OFF = ["-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
                          "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DGGML_AVX_VNNI=OFF"]
_AVX2 = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
         *_AVX512_EXTENSIONS_OFF]
# "native-no-amx": every x86 extension to AVX-512 BF16 and VNNI, and no AMX. With AMX, llama.cpp's Q8_0 weights died of
# SIGILL on the Xeon of 2026-12-06 (tilezero in a worker thread of its AMX int8 kernels); pagedllm's kernels use no
# AMX either, so that is the native peer on a CPU with AMX (NATIVE).
BUILDS = {"native": ["-DGGML_NATIVE=ON"], "avx2": [*_AVX2, "-DGGML_AVX512=OFF"], "avx512": [*_AVX2, "-DGGML_AVX512=ON"],
          "native-no-amx": [*_AVX2, "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
                            "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON"],
          # no x86 extension past x86-64's SSE2 (and SSE4.2), the peer of the portable tier
          "portable": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF",
                       "-DGGML_BMI2=OFF", "-DGGML_AVX512=OFF", *_AVX512_EXTENSIONS_OFF]}


NATIVE = "native-no-amx" if cpu_isa.host().has("amx_int8") else "native"
DESCRIBED = {"native": "`-DGGML_NATIVE=ON`",
             "native-no-amx": "AVX-512 with BF16, VNNI and VBMI, AMX off (its AMX int8 kernels died of SIGILL on a "
                              "Xeon with AMX; pagedllm uses none)"}


def build_folder(build: str = NATIVE) -> str:
    return "build" if build == "native" else f"build-{build}"


def binaries(build: str = NATIVE) -> Path:
    src = source()
    folder = build_folder(build)
    bin_dir = src / folder / "bin"
    if all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    print(f"llama.cpp: building {', '.join(TARGETS)}, {build} (a few minutes)", file=sys.stderr)
    _run(["cmake", "-B", folder, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", *BUILDS[build]], cwd=src)
    _run(["cmake", "--build", folder, "-j2", "--target", *TARGETS], cwd=src)
    return bin_dir


def gguf(outtype: str) -> Path:
    """The embedded model as GGUF of `outtype` (bf16, q8_0), converted in a venv of the converter's own."""
    target = home() / f"smollm2-{outtype}.gguf"
    if target.exists():
        return target
    venv = home() / "venv"
    if not (venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(venv / "bin" / "pip"), "install", "-q", *CONVERTER_PACKAGES])
    src = source()
    _run([str(venv / "bin" / "python"), str(src / "convert_hf_to_gguf.py"), str(ensure_default_model()),
          "--outtype", outtype, "--outfile", str(target)], env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    return target


def lora_gguf(adapter: Path, outfile: Path) -> Path:
    """A PEFT adapter of the embedded model as a GGUF LoRA (llama.cpp's --lora), float32, by llama.cpp's converter."""
    gguf("bf16")  # the converter's venv
    src = source()
    _run([str(home() / "venv" / "bin" / "python"), str(src / "convert_lora_to_gguf.py"), str(adapter), "--base",
          str(ensure_default_model()), "--outtype", "f32", "--outfile", str(outfile)],
         env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    return outfile


def bench(model: Path, *args: str, build: str = NATIVE) -> float:
    """llama-bench's tokens/s for one test (e.g. `-p 0 -n 64`, `-p 512 -n 0`, `-d 4096`), 2 threads."""
    out = _run([str(binaries(build) / "llama-bench"), "-m", str(model), "-t", "2", "-r", "3", "-o", "json", *args])
    return float(json.loads(out)[0]["avg_ts"])


def batched_generation(model: Path, parallel: list[int], prompt: int = 40, generate: int = 64,
                       build: str = NATIVE, lora: Path | None = None) -> dict[int, float]:
    """llama-batched-bench's generation tokens/s (S_TG) at each number of parallel sequences; with `lora`, every
    sequence runs with that adapter (the one mode it has)."""
    ctx = max(parallel) * (prompt + generate) + 256
    out = _run([str(binaries(build) / "llama-batched-bench"), "-m", str(model), "-t", "2", "-tb", "2", "-c", str(ctx),
                "-npp", str(prompt), "-ntg", str(generate), "-npl", ",".join(map(str, parallel)),
                "--output-format", "jsonl", *(["--lora", str(lora)] if lora else [])])
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row["pl"]: row["speed_tg"] for row in rows}
