"""pagedllm's engine vs llama.cpp on this CPU, same weights, same run: batch-1 decode (also at a 4,096-token
context), batched generation, prompt processing, and int8 against llama.cpp's Q8_0.

    python -m perf.bench_llamacpp            # this CPU's tier; 3 alternating rounds, medians; writes perf/RESULTS.md
    python -m perf.bench_llamacpp --isa avx2 # a lower tier forced on this CPU, against llama.cpp's AVX2 build
    python -m perf.bench_llamacpp --isa avx512  # AVX-512 without BF16, against llama.cpp's build of the same
    python -m perf.bench_llamacpp --rounds 1 --no-write

llama.cpp is built once into the cache (perf/llamacpp.py). Every round runs each setting on each system in
turn (this machine's speed drifts by a quarter within minutes), and the medians of the rounds are reported.
pagedllm's figures time the engine's own steps (scheduler, model, sampler, detokenizer) in-process, on requests
as LLM.generate makes them (OutputKind.FINAL_ONLY: the output handed out, and its text decoded, at the end);
llama.cpp's are those its tools print. "pagedllm torch" is the same engine on the plain-torch path
(`attention_backend="torch"`), what ran before the CPU kernels (native tier only).

`--isa avx2` (or avx512, portable) runs pagedllm's kernels of that tier and llama.cpp built for the same
instruction set (for portable: SSE only), and restricts torch to the same tier
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA), so that an AVX-512 BF16 machine measures what an older one would run.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.cache import cache_dir
from pagedllm.engine.attention import QueryGroup, kernel_metadata
from pagedllm.engine.huge_pages import HugePageArena
from pagedllm.engine.kernels import cpu as cpu_kernels
from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.sequence import OutputKind
from pagedllm.weights import ensure_default_model
from perf import llamacpp
from perf.bench_startup import offline_start
from perf.results import write_section

PARALLEL = [1, 8, 32, 64]
BYTE_A_WEIGHT = {"pagedllm int8", "llama.cpp Q8_0"}  # their scales left out; the others read bf16, two bytes
SETTINGS = ["decode b1", "decode b1 at 4096", "prompt 512", "prompt 4096"] + [f"{n} parallel" for n in PARALLEL]
_ids = itertools.count()


def _timed_generation(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Generation tokens/s once every prompt is processed (the first token of each comes with its prompt)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    seqs = []
    for p in prompts:
        request_id = f"bench-{next(_ids)}"
        engine.add_request(request_id, p, params, output_kind=OutputKind.FINAL_ONLY)
        seqs.append(engine.requests[request_id])
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return sum(s.num_output_tokens - 1 for s in seqs) / (time.perf_counter() - start)


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n, length), generator=g).tolist()


def ours(llm: LLM, setting: str, seed: int) -> float:
    """One round of `setting`; batch-1 settings are the mean of 3 runs, as llama-bench's `-r 3`."""
    if setting.endswith("parallel"):
        return _once(llm, setting, seed * 100)
    return statistics.mean(_once(llm, setting, seed * 100 + r) for r in range(3))


def _once(llm: LLM, setting: str, seed: int) -> float:
    seed = seed * 10 + SETTINGS.index(setting)  # every run its own prompts: no prefix-cache hits
    if setting == "decode b1":
        return _timed_generation(llm, _prompts(1, 40, seed), 64)
    if setting == "decode b1 at 4096":
        return _timed_generation(llm, _prompts(1, 4096, seed), 64)
    if setting.startswith("prompt"):  # its time to first token
        length = int(setting.split()[1])
        start = time.perf_counter()
        llm.generate(_prompts(1, length, seed), SamplingParams(max_tokens=1), use_tqdm=False)
        return length / (time.perf_counter() - start)
    return _timed_generation(llm, _prompts(int(setting.split()[0]), 40, seed), 64)


def peer(model: Path, setting: str, build: str) -> float:
    if setting == "decode b1":
        return llamacpp.bench(model, "-p", "0", "-n", "64", build=build)
    if setting == "decode b1 at 4096":
        return llamacpp.bench(model, "-p", "0", "-n", "64", "-d", "4096", build=build)
    if setting.startswith("prompt"):
        return llamacpp.bench(model, "-p", setting.split()[1], "-n", "0", build=build)
    n = int(setting.split()[0])
    return llamacpp.batched_generation(model, [n], build=build)[n]


# torch held to a tier below the CPU's, so that the forced tier's plain-torch pieces run as they would there
TORCH_TIERS = {"avx512": ("avx512", "AVX512_CORE"), "avx2": ("avx2", "AVX2"), "portable": ("default", "SSE41")}


def _restrict_torch(isa: str) -> None:
    """Re-executes this script with torch restricted to `isa`'s instruction set (read once, at torch's start)."""
    if isa not in TORCH_TIERS or os.environ.get("ATEN_CPU_CAPABILITY"):
        return
    aten, onednn = TORCH_TIERS[isa]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}
    os.execve(sys.executable, [sys.executable, "-m", "perf.bench_llamacpp", *sys.argv[1:]], env)


@functools.cache
def _read_buffer() -> torch.Tensor:
    return torch.ones(1 << 28)


def memory_bandwidth(passes: int = 3) -> float:
    """GB/s of a 2-thread read of 1 GiB (torch's sum), the best of `passes`."""
    x = _read_buffer()
    best = min(_seconds(x.sum) for _ in range(passes))
    return x.numel() * 4 / best / 1e9


def with_memory_read(run: Callable[[], float]) -> tuple[float, float]:
    """`run`'s result, and the memory read measured just before and after it (their mean): the floor of the same
    minute. This host's memory speed drifts within minutes (Zen 4: a batch-1 step's kernel 5.8 ms in one run, 8.4 ms
    in the run before it), so a floor read once, at the best minute, undercounts every other."""
    before = memory_bandwidth()
    value = run()
    return value, (before + memory_bandwidth()) / 2


def attention_bandwidth(llm: LLM, isa: str, context: int = 4096, copies: int = 4) -> float:
    """GB/s at which the kernels' decode attention reads one sequence's cache of `context` positions, every layer's
    in turn, from memory: `copies` sets of the model's caches taken in rotation, more than the L3 holds, in huge
    pages as the engine keeps its cache (from torch's 4 KB pages Zen 4 read them 11% slower). The best of 5 passes
    over the sets."""
    c, block_size = llm.engine.model_config, llm.engine.config.block_size
    heads, kv_heads, head_dim, blocks = c.num_attention_heads, c.num_key_value_heads, c.head_dim, context // block_size
    ops = cpu_kernels.load(isa)
    shape = (2, kv_heads, blocks, block_size, head_dim)
    arena = HugePageArena(copies * c.num_hidden_layers * HugePageArena.nbytes(shape, torch.bfloat16))
    sets = [[arena.place(torch.randn(shape, dtype=torch.bfloat16)) for _ in range(c.num_hidden_layers)]
            for _ in range(copies)]
    meta = kernel_metadata([0], [QueryGroup(0, 1, 1, [list(range(blocks))], [context])], torch.device("cpu"))
    q = torch.randn(1, heads * head_dim, dtype=torch.bfloat16)

    def attend() -> None:
        for caches in sets:
            for cache in caches:
                ops.paged_attention(q, cache, meta.block_tables, meta.token_seq, meta.prefill_seqs,
                                    meta.context_lens, heads, kv_heads, head_dim, head_dim ** -0.5,
                                    fetch_ahead=llm.engine.runner.model.kv_fetch_ahead)

    passes = [_seconds(attend) for _ in range(6)][1:]
    return copies * sum(x.numel() * x.element_size() for x in sets[0]) / min(passes) / 1e9


def matmul_rate() -> float:
    """bf16 GFLOP/s of torch's matmul at prompt-processing shape (512 x 576 @ 576 x 3072)."""
    a, b = torch.randn(512, 576, dtype=torch.bfloat16), torch.randn(576, 3072, dtype=torch.bfloat16)
    best = min(_seconds(lambda: a @ b) for _ in range(20))
    return 2 * 512 * 576 * 3072 / best / 1e9


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def perplexity(llm: LLM, text: str, window: int = 512) -> float:
    """Perplexity of `text` in windows of `window` tokens, each scored from its start (a prefill whose logits
    are kept for every position). Run on a fresh engine: the KV blocks it writes are not reserved."""
    from pagedllm.engine.attention import QueryGroup, build_metadata
    runner = llm.engine.runner
    ids = llm.engine.encode(text)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        n = len(chunk) - 1
        bs = runner.block_size
        blocks = list(range(-(-n // bs)))
        meta = build_metadata(list(range(n)), [QueryGroup(0, 1, n, [blocks], [n])], runner.geometry, runner.dtype,
                              runner.device, runner.backend.kernel_metadata_only)
        x = torch.tensor(chunk[:-1])
        logits = runner.model(x, torch.arange(n), runner.kv_caches, meta, torch.arange(n))
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        count += n
    return float(torch.tensor(nll / count).exp())


CHATS = ["What is the capital of France?", "Write a haiku about autumn leaves.", "Why is the sky blue?",
         "How do I reverse a list in Python?"]


def greedy_answers(llms: dict[str, LLM]) -> dict[str, list[list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=48)
    return {name: [llm.chat([{"role": "user", "content": q}], params, use_tqdm=False)[0].token_ids for q in CHATS]
            for name, llm in llms.items()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def kernel_build_seconds(isa: str) -> float:
    """A cold build of the CPU kernels in a new process, into a scratch folder (the cached build stays)."""
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        code = ("import sys, pathlib; from pagedllm.engine.kernels import cpu as cpu_kernels; "
                "cpu_kernels.build(pathlib.Path(sys.argv[1]), cpu_kernels.CpuIsa(sys.argv[2]))")
        subprocess.run([sys.executable, "-c", code, scratch, isa], check=True, capture_output=True)
        return time.perf_counter() - start


def python_per_step(llm: LLM, name: str, steps: int = 128) -> tuple[float, float]:
    """(us, ms) per batch-1 decode step: the time outside the kernels' one call (scheduler, the step's inputs,
    sampler, output side), and the whole step."""
    engine, model = llm.engine, llm.engine.runner.model
    kernels_call, inside = model._forward_step, [0]

    def timed(*args):
        start = time.perf_counter_ns()
        try:
            return kernels_call(*args)
        finally:
            inside[0] += time.perf_counter_ns() - start

    model._forward_step = timed
    try:
        engine.add_request(name, [1, 2, 3, 4], SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True),
                           output_kind=OutputKind.FINAL_ONLY)
        engine.step()  # the prompt
        inside[0], total, count = 0, 0, 0
        while engine.has_unfinished_requests():
            start = time.perf_counter_ns()
            engine.step()
            total, count = total + time.perf_counter_ns() - start, count + 1
    finally:
        model._forward_step = kernels_call
    return (total - inside[0]) / count / 1e3, total / count / 1e6


def num_parameters(llm: LLM) -> int:
    """Weights a decode step reads: every layer's, the final norm and the (tied or not) LM head."""
    c = llm.engine.model_config
    attention = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    attention += c.num_attention_heads * c.head_dim * c.hidden_size
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    return c.num_hidden_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md and the plot as they are")
    ap.add_argument("--isa", default="auto", help="the kernels' tier (default: this CPU's best); a lower one is "
                                                  "compared with llama.cpp built for the same instruction set")
    args = ap.parse_args()
    native = cpu_isa.choose("auto", cpu_isa.host())
    isa = cpu_isa.choose(args.isa, cpu_isa.host(), "--isa")
    if isa != native:
        _restrict_torch(isa.value)
    args.isa, args.build = isa.value, llamacpp.NATIVE if isa == native else isa.value  # llama.cpp's build of that tier
    torch.set_num_threads(2)
    path = str(ensure_default_model())
    offline_start(cache_dir(), isa.value)  # builds the kernels where their source changed (ninja goes by mtime)
    warm = offline_start(cache_dir(), isa.value)
    start_up_seconds, build_seconds = warm.first_token - warm.imports, kernel_build_seconds(isa.value)
    llms = {"pagedllm bf16": LLM(path, dtype="bfloat16", cpu_isa=isa.value),
            "pagedllm int8": LLM(path, dtype="bfloat16", quantization="int8", cpu_isa=isa.value)}
    if isa == native:  # below it, torch's bf16 linears would take hours at batch 64
        llms["pagedllm torch"] = LLM(path, dtype="bfloat16", attention_backend="torch")
    text = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
    ppl = {name: perplexity(llm, text) for name, llm in llms.items()}  # first: on fresh engines
    reference = {} if isa == native else {"reference": LLM(path, dtype="bfloat16", cpu_isa=native.value)}
    answers = greedy_answers({**llms, **reference})
    answers.setdefault("reference", answers.get("pagedllm torch"))
    reference.clear()  # its memory back before the timed runs
    peers = {"llama.cpp BF16": llamacpp.gguf("bf16"), "llama.cpp Q8_0": llamacpp.gguf("q8_0")}
    runs: dict[tuple[str, str], list[float]] = {}
    reads: dict[str, list[float]] = {}  # GB/s read around each one's batch-1 decode runs
    python: list[tuple[float, float]] = []
    for r in range(args.rounds):
        for setting in SETTINGS:
            systems = {**{name: functools.partial(peer, model, setting, args.build) for name, model in peers.items()},
                       **{name: functools.partial(ours, llm, setting, r) for name, llm in llms.items()}}
            for name, run in systems.items():
                if setting == "decode b1":
                    value, read = with_memory_read(run)
                    reads.setdefault(name, []).append(read)
                else:
                    value = run()
                runs.setdefault((name, setting), []).append(value)
            print(f"round {r + 1}, {setting}:", {k[0]: f"{v[-1]:.0f}" for k, v in runs.items() if k[1] == setting})
        python.append(python_per_step(llms["pagedllm bf16"], f"python per step {r}"))
    medians = {key: statistics.median(v) for key, v in runs.items()}
    python_us, step_ms = statistics.median(p[0] for p in python), statistics.median(p[1] for p in python)
    params = num_parameters(llms["pagedllm bf16"])
    floors = {name: _floor_shares(runs[(name, "decode b1")], reads[name], params * (1 if name in BYTE_A_WEIGHT else 2))
              for name in reads}
    attention = with_memory_read(lambda: attention_bandwidth(llms["pagedllm bf16"], args.isa))
    body = report(args, medians, (statistics.median(sum(reads.values(), [])), floors), matmul_rate(), ppl, answers,
                  llms, (start_up_seconds, build_seconds), (python_us, step_ms), attention)
    print(body)
    if not args.no_write:
        suffix = "" if isa == native else f"_{isa}"
        plot(medians, Path(__file__).with_name(f"llamacpp{suffix}.png"), isa.value)
        write_section(f"bench_llamacpp{suffix}", body)


def _floor_shares(tokens_per_second: list[float], reads: list[float], bytes_per_token: int) -> list[float]:
    """Each batch-1 decode run's tokens/s as a share of the weight-read floor of its own minute."""
    return [tps * bytes_per_token / (read * 1e9) for tps, read in zip(tokens_per_second, reads)]


def report(args, med, memory, matmul, ppl, answers, llms, start, python, attention) -> str:
    params = num_parameters(llms["pagedllm bf16"])
    c = llms["pagedllm bf16"].engine.model_config
    bandwidth, floors = memory
    floor = bandwidth * 1e9 / (2 * params)

    def share(name: str) -> str:
        shares = floors[name]
        return f"**{statistics.median(shares):.0%}** ({', '.join(f'{x:.0%}' for x in shares)})"
    names = ["llama.cpp BF16", "llama.cpp Q8_0", *llms]
    lines = ["| setting, tokens/s | " + " | ".join(names) + " | pagedllm bf16 / llama.cpp BF16 | int8 / Q8_0 |",
             "|---" + "|---:" * (len(names) + 2) + "|"]
    for s in SETTINGS:
        row = [f"{med[(n, s)]:.0f}" for n in names]
        bf16 = med[("pagedllm bf16", s)] / med[("llama.cpp BF16", s)]
        int8 = med[("pagedllm int8", s)] / med[("llama.cpp Q8_0", s)]
        lines.append(f"| {s} | " + " | ".join(row) + f" | **{bf16:.2f}x** | **{int8:.2f}x** |")
    pp_gflops = 2 * (params - c.vocab_size * c.hidden_size) * med[("pagedllm bf16", "prompt 512")] / 1e9
    ppl_rows = "\n".join(f"| {n} | {v:.3f} | {v / ppl['pagedllm bf16'] - 1:+.2%} |" for n, v in ppl.items())
    tok = llms["pagedllm bf16"].tokenizer
    answer_rows = []
    for i, q in enumerate(CHATS):
        fast, int8 = answers["pagedllm bf16"][i], answers["pagedllm int8"][i]
        eager = answers["reference"][i]
        diff = first_difference(fast, eager)
        same = "identical" if diff is None else f"first differs at token {diff}"
        answer_rows.append(f"| {q} | {tok.decode(fast)!r} | {same} | {tok.decode(int8)!r} |")
    forced = args.build != llamacpp.NATIVE
    command = "`python -m perf.bench_llamacpp" + (f" --isa {args.isa}`" if forced else "`")
    peer_isa = {"avx512": "AVX-512F/BW/VL/DQ (no BF16, VNNI or VBMI) and no AMX",
                "portable": "x86-64 with SSE only (AVX, AVX2, FMA, F16C, AVX-512 and AMX off)"}.get(
        args.build, "AVX2 + FMA + F16C with every AVX-512 and AMX option off")
    tier = (f"Tier: pagedllm's **{args.isa}** kernels forced on this CPU, torch held to the same instruction set, "
            f"against llama.cpp built\nfor {peer_isa}.\n\n" if forced else
            f"Tier: pagedllm's **{args.isa}** kernels (this CPU's best), llama.cpp built with "
            f"{llamacpp.DESCRIBED[args.build]}.\n\n")
    return (tier + f"{command} — SmolLM2-135M-Instruct, the same weights in both engines "
            "(llama.cpp 0c1e57098\n"
            f"from the {llamacpp.SDIST} sdist, GGUF converted by its own `convert_hf_to_gguf.py`), 2 threads, "
            "medians of\n"
            f"{args.rounds} alternating rounds. Decode: 64 new tokens after a 40-token prompt "
            "(`llama-bench -p 0 -n 64`, and\n"
            "`-d 4096` for a 4,096-token context); prompt N: `llama-bench -p N -n 0` against pagedllm's time "
            "to first token of\n"
            "an N-token prompt; N parallel: generation tokens/s of N sequences, 40-token prompts, 64 new tokens "
            "each\n"
            "(`llama-batched-bench -npp 40 -ntg 64 -npl N`, S_TG)."
            + (" pagedllm torch is the plain-torch path (before the CPU kernels).\n" if not forced else "\n") +
            "\n"
            f"{chr(10).join(lines)}\n"
            "\n"
            "Memory read (a 2-thread read of 1 GiB, best of 3) measured just before and after each batch-1 decode "
            f"run: median\n{bandwidth:.0f} GB/s, so reading the {2 * params / 1e6:.0f} MB of bf16 weights once per "
            f"token bounds batch-1 decode at about {floor:.0f} tok/s.\n"
            "Each run against the floor of its own minute (its tokens/s times the bytes of weights a token reads, "
            "over that read),\nmedian and rounds: pagedllm bf16 "
            f"{share('pagedllm bf16')}, llama.cpp BF16 {share('llama.cpp BF16')}; with a byte a weight,\npagedllm "
            f"int8 {share('pagedllm int8')}, llama.cpp Q8_0 {share('llama.cpp Q8_0')}.\n"
            f"Prompt processing runs the linears at about {pp_gflops:.0f} GFLOP/s; "
            "torch's bf16 matmul on this\n"
            f"machine: {matmul:.0f} GFLOP/s.\n"
            "\n"
            "Decode attention at 4,096 positions, alone (one sequence, every layer's bf16 cache in turn, from "
            f"memory): {attention[0]:.0f} GB/s,\n{attention[0] / attention[1]:.0%} of the memory read just "
            f"before and after it ({attention[1]:.0f} GB/s).\n"
            "\n"
            f"Python per batch-1 decode step of pagedllm bf16, outside the kernels' one call (scheduler, the step's "
            f"inputs, sampler,\noutput side): {python[0]:.0f} us of a {python[1]:.2f} ms step "
            f"({python[0] / 1e3 / python[1]:.1%}).\n"
            "\n"
            f"Start-up, `LLM()` to the first token in a new process, model and kernels cached: {start[0]:.1f} s; "
            "building the\n"
            f"kernels the first time on a machine (done once, by `make setup`) takes {start[1]:.0f} s more.\n"
            "\n"
            "Quality, perplexity of perf/data/perplexity.txt (windows of 512 tokens):\n"
            "\n"
            "| engine | perplexity | vs pagedllm bf16 |\n"
            "|---|---:|---:|\n"
            f"{ppl_rows}\n"
            "\n"
            "Greedy answers to chat prompts (48 tokens): pagedllm bf16 on the CPU kernels, whether "
            + ("the native tier's kernels" if forced else "the plain-torch bf16 path") + " give the same tokens, "
            "and int8:\n"
            "\n"
            f"| prompt | pagedllm bf16 | {'native tier' if forced else 'plain-torch bf16'} | pagedllm int8 |\n"
            "|---|---|---|---|\n"
            f"{chr(10).join(answer_rows)}\n"
            "\n"
            f"![llama.cpp comparison](llamacpp{'_' + args.isa if forced else ''}.png)\n")


COLOURS = {"llama.cpp BF16": "#1f77b4", "llama.cpp Q8_0": "#aec7e8", "pagedllm bf16": "#d62728",
           "pagedllm int8": "#ff9896", "pagedllm torch": "#7f7f7f"}


def plot(med: dict[tuple[str, str], float], out: Path, isa: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    present = {name: colour for name, colour in COLOURS.items() if (name, SETTINGS[0]) in med}
    width = 0.8 / len(present)
    for i, (name, colour) in enumerate(present.items()):
        xs = [j + i * width for j in range(len(SETTINGS))]
        ax.bar(xs, [med[(name, s)] for s in SETTINGS], width, label=name, color=colour)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SETTINGS))], SETTINGS)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log scale)")
    ax.set_title(f"pagedllm ({isa} kernels) vs llama.cpp, SmolLM2-135M, 2 CPU threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
