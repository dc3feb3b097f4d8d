"""The int8 KV cache (`kv_cache_dtype="int8"`, issue 35) against the model's dtype, beside llama.cpp's q8_0 cache
against its f16 one, in one run: capacity, batch-1 decode at a long context, perplexity, greedy answers, and which
scale granularity loses less (one per position and KV head, as shipped, or one per 16-position block and head).

    python -m perf.bench_kv_cache                # 3 alternating rounds, medians; writes perf/RESULTS.md
    python -m perf.bench_kv_cache --rounds 1 --no-write
    python -m perf.bench_kv_cache --quick        # a smoke run: short contexts, bf16 weights only, llama.cpp only
                                                 # if already built and converted; does not touch RESULTS.md

Capacity: sequences of `--context` prompt tokens + `--new-tokens` in `--kv-cache-memory`, as computed from the
engine's blocks; measured (1) by the engine itself at that size with its model replaced by a stub that returns
fixed logits (the scheduler, block manager and step are the engine's own; no KV is written), and (2) with the real
model at `--measured-memory` (small, so that few 4k prefills run). Each submits one sequence more than fit and
counts the most that decode at once and run to their end never preempted. llama.cpp: KV bytes per token from its
own `llama_kv_cache: size = ...` line, loading a `-c 4096` context (llama-perplexity, which then stops: the text is
too short for that context). Decode and perplexity reuse perf/bench_llamacpp.py's helpers.
"""
from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from pagedllm import LLM, SamplingParams
from pagedllm.engine import kv_quant
from pagedllm.engine.kernels import cpu_isa
from pagedllm.weights import ensure_default_model
from perf import llamacpp
from perf.bench_llamacpp import CHATS, _prompts, _timed_generation, first_difference, greedy_answers, perplexity
from perf.results import write_section

TEXT = Path(__file__).parent / "data" / "perplexity.txt"
PEER = {"bf16": ("bf16", "BF16"), "int8": ("q8_0", "Q8_0")}  # our weights -> llama.cpp's GGUF and its name
CACHE = {"auto": "f16", "int8": "q8_0"}  # our KV cache -> llama.cpp's


def engine(kv: str, weights: str = "bf16", memory: int = 1 << 30, **kw) -> LLM:
    quant = {"quantization": "int8"} if weights == "int8" else {}
    return LLM(str(ensure_default_model()), dtype=kw.pop("dtype", "bfloat16"), kv_cache_dtype=kv,
               kv_cache_memory=memory, **quant, **kw)


# ---- capacity ---------------------------------------------------------------------------------------------------
def capacity(llm: LLM, context: int, new_tokens: int, stub: bool) -> dict[str, int]:
    """Submits one sequence more (`context` random prompt tokens, `new_tokens` generated, ignore_eos) than the
    blocks hold, all started in one step, and steps the engine until as many as the blocks hold have finished (the
    first wave: they advance in lockstep); `measured`: the most decoding at once (prompts done) of those never
    preempted (the scheduler starts a sequence whose prompt fits in the free blocks, and preempts the newest when
    the others' growth needs its blocks). `stub`: the model is replaced by fixed logits (nothing computed, no KV
    written)."""
    e = llm.engine
    per_seq = -(-(context + new_tokens) // e.config.block_size)
    computed = e.num_blocks // per_seq
    if stub:
        logits = torch.zeros(e.model_config.vocab_size)
        logits[1000] = 1.0
        e.runner.execute = lambda inp: logits.expand(len(inp.sample_indices), -1).clone()
    # a budget for every prompt at once, so that all that fit start together (else the first would finish before
    # the last started: a 4k prompt takes two steps of the default 2,048 tokens)
    budget, e.scheduler.max_num_batched_tokens = e.scheduler.max_num_batched_tokens, (computed + 1) * context
    before = e.stats().num_preemptions
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    seqs = []
    for i, prompt in enumerate(_prompts(computed + 1, context, seed=7919 + context)):
        e.add_request(f"capacity-{stub}-{i}", prompt, params)
        seqs.append(e.requests[f"capacity-{stub}-{i}"])
    peak_running, decoding = 0, []
    while e.has_unfinished_requests() and sum(s.finished for s in seqs) < computed:
        e.step()
        peak_running = max(peak_running, e.stats().num_running)
        decoding.append([s for s in e.scheduler.running if s.num_computed_tokens >= s.num_prompt_tokens])
    for s in seqs:
        e.abort(s.request_id)  # those left (none if finished)
    e.scheduler.max_num_batched_tokens = budget
    if stub:
        del e.runner.execute  # the class's again
    measured = max(sum(s.num_preemptions == 0 for s in step) for step in decoding)
    return {"num_blocks": e.num_blocks, "computed": computed, "measured": measured, "submitted": len(seqs),
            "peak_running": peak_running, "preemptions": e.stats().num_preemptions - before}


def pagedllm_bytes_per_token(llm: LLM) -> int:
    caches = llm.engine.runner.kv_caches
    return sum(c.numel() * c.element_size() for c in caches) // (llm.engine.num_blocks * llm.engine.config.block_size)


# ---- llama.cpp --------------------------------------------------------------------------------------------------
def peer_ready() -> bool:
    """Built and converted already (the quick run builds nothing)."""
    home = llamacpp.home()
    return (any(home.glob(f"llama_cpp_python-*/vendor/llama.cpp/{llamacpp.build_folder()}/bin/llama-perplexity"))
            and all((home / f"smollm2-{g}.gguf").exists() for g, _ in PEER.values()))


class PeerCrashed(RuntimeError):
    pass


def llama_perplexity(model: Path, cache: str, ctx: int, text: Path) -> str:
    """llama-perplexity's log (stdout and stderr; `-lv 4`: the KV cache's lines are info, not printed by default),
    2 threads, flash attention, `cache` for K and V."""
    done = subprocess.run([str(llamacpp.binaries() / "llama-perplexity"), "-m", str(model), "-f", str(text),
                           "-c", str(ctx), "-t", "2", "-fa", "1", "-ctk", cache, "-ctv", cache, "-lv", "4"],
                          capture_output=True, text=True)
    if done.returncode < 0:  # e.g. SIGILL: the native build's AMX int8 path where the kernel does not enable AMX
        raise PeerCrashed(f"llama-perplexity on {model.name} died of {signal.Signals(-done.returncode).name}")
    return done.stdout + done.stderr


def peer_kv_bytes_per_token(model: Path, cache: str, ctx: int) -> tuple[float, bool]:
    """From `llama_kv_cache: size = X MiB (N cells, L layers, S/S seqs)`: llama.cpp's KV bytes per token at a `ctx`
    context; and whether it rotates keys before quantizing them (`attn_rot_k = 1`: a Hadamard transform)."""
    log = llama_perplexity(model, cache, ctx, TEXT)  # stops after loading: the text is too short for `ctx`
    found = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +\d+ layers, +\d+/(\d+) seqs", log)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no KV cache size:\n{log[-2000:]}")
    return float(found[1]) * 2 ** 20 / (int(found[2]) * int(found[3])), "attn_rot_k = 1" in log


def peer_perplexity(model: Path, cache: str, ctx: int, text: Path) -> float:
    log = llama_perplexity(model, cache, ctx, text)
    found = re.search(r"Final estimate: PPL = ([\d.]+)", log)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{log[-2000:]}")
    return float(found[1])


# ---- scale granularity ------------------------------------------------------------------------------------------
def fake_quantize(x: torch.Tensor, slots: torch.Tensor, block_size: int, per_block: bool) -> torch.Tensor:
    """x [T, 2 * KVH, D] quantized and dequantized as kv_quant does, with one scale per position and head, or per
    block (of the slots written in this call) and head: the block's largest |x| / 127, rounded up to bfloat16."""
    x = x.float()
    if not per_block:
        return kv_quant.dequantize(*kv_quant.quantize(x))
    blocks, index = torch.unique(slots // block_size, return_inverse=True)
    rows = x.abs().amax(-1)
    amax = torch.zeros(len(blocks), x.shape[1]).scatter_reduce_(0, index[:, None].expand_as(rows), rows, "amax")
    scales = kv_quant.quantize(amax[..., None])[1].float()[index][..., None]  # kv_quant's scale of each block's max
    return torch.round(x / scales).clamp(-127, 127) * scales


def granularity(text: str) -> dict[str, tuple[float, float | None, float | None]]:
    """Perplexity on the torch backend in float32 (so that a float32 cache holds dequantized values exactly) with:
    no quantization; the shipped int8 cache; and the write of a float32 cache wrapped to store K/V quantized and
    dequantized per position and head (must equal the shipped one) or per 16-position block and head. Each
    perplexity window is one prefill, so every block is written whole, in one call: its scale is that of its final
    contents (the best case for a scale per block). Also the relative RMS error of K and of V of each granularity
    over the real keys and values of the text."""
    plain, shipped = engine("auto", memory=64 << 20, dtype="float32", attention_backend="torch"), \
        engine("int8", memory=64 << 20, dtype="float32", attention_backend="torch")
    attns = [layer.attn for layer in plain.engine.runner.model.layers]
    bs, kvh = plain.engine.config.block_size, plain.engine.model_config.num_key_value_heads
    sums = {g: torch.zeros(2, 2, dtype=torch.float64) for g in (False, True)}  # [K, V] x [error², value²]

    def hook(attn, per_block: bool | None):
        write = attn.write_kv

        def write_kv(kv, kv_cache, meta):
            if per_block is None:  # observe: both granularities' errors, the cache unchanged
                for g, s in sums.items():
                    err = (fake_quantize(kv, meta.slot_mapping, bs, g) - kv.float()).double()
                    for i, part in enumerate((slice(0, kvh), slice(kvh, None))):
                        s[i, 0] += err[:, part].square().sum()
                        s[i, 1] += kv[:, part].double().square().sum()
                return write(kv, kv_cache, meta)
            return write(fake_quantize(kv, meta.slot_mapping, bs, per_block), kv_cache, meta)
        attn.write_kv = write_kv

    results = {}
    for name, mode in (("none", None), ("per position & head (simulated)", False),
                       ("per 16-position block & head (simulated)", True)):
        for attn in attns:
            hook(attn, mode)
        results[name] = perplexity(plain, text)
        for attn in attns:
            del attn.write_kv
    results["per position & head (shipped int8)"] = perplexity(shipped, text)
    rms = {g: (s[:, 0] / s[:, 1]).sqrt().tolist() for g, s in sums.items()}
    return {"none (float32 cache)": (results["none"], None, None),
            "per position & head (shipped int8)": (results["per position & head (shipped int8)"], *rms[False]),
            "per position & head (simulated)": (results["per position & head (simulated)"], *rms[False]),
            "per 16-position block & head (simulated)": (results["per 16-position block & head (simulated)"],
                                                         *rms[True])}


# ---- the run ----------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kv-cache-memory", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--measured-memory", type=int, default=192,
                    help="MiB for the capacity check with the real model (default 192: 2 bf16 sequences, 4 int8)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=16, help="generated per sequence in the capacity checks")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    ap.add_argument("--quick", action="store_true", help="tiny run; does not touch RESULTS.md")
    args = ap.parse_args()
    args.repeats, args.peer_window, text = 3, 256, TEXT.read_text()
    weights = ["bf16", "int8"]
    if args.quick:
        args.rounds, args.kv_cache_memory, args.measured_memory, args.context = 1, 64, 24, 512
        args.new_tokens, args.decode_tokens, args.repeats, args.peer_window = 8, 8, 1, 128
        weights, text = ["bf16"], text[:1500]
    torch.set_num_threads(2)
    isa = cpu_isa.choose("auto", cpu_isa.host()).value
    memory = args.kv_cache_memory << 20
    llms = {(w, kv): engine(kv, w, memory) for w in weights for kv in ("auto", "int8")}
    ppl = {key: perplexity(llm, text) for key, llm in llms.items()}  # first: on fresh engines
    print("perplexity:", {f"{w} kv {kv}": f"{v:.4f}" for (w, kv), v in ppl.items()}, flush=True)
    scales = granularity(text)
    print("granularity:", {k: f"{v[0]:.4f}" for k, v in scales.items()}, flush=True)
    answers = greedy_answers({key: llm for key, llm in llms.items()})

    peer = not args.quick or peer_ready()
    peer_ppl, peer_bytes, ppl_file, peer_weights, args.peer_crashes = {}, {}, TEXT, [], []
    if peer:
        if args.quick:
            ppl_file = Path(tempfile.mkdtemp()) / "perplexity.txt"
            ppl_file.write_text(text)
        for w in weights:
            model = llamacpp.gguf(PEER[w][0])
            try:
                for kv, cache in CACHE.items():
                    peer_ppl[(w, kv)] = peer_perplexity(model, cache, args.peer_window, ppl_file)
                peer_weights.append(w)
            except PeerCrashed as e:  # those weights are left out of llama.cpp's rows, and the report says why
                args.peer_crashes.append(str(e))
        for kv, cache in CACHE.items():
            peer_bytes[kv] = peer_kv_bytes_per_token(llamacpp.gguf("bf16"), cache, 4096)
        print("llama.cpp perplexity:", peer_ppl, "KV bytes/token:", peer_bytes, flush=True)

    runs: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for w in weights:
            for kv in ("auto", "int8"):
                if w in peer_weights:
                    runs.setdefault(("llama.cpp", w, kv), []).append(llamacpp.bench(
                        llamacpp.gguf(PEER[w][0]), "-p", "0", "-n", str(args.decode_tokens), "-d", str(args.context),
                        "-fa", "1", "-ctk", CACHE[kv], "-ctv", CACHE[kv]))
                # the same prompt every time: after the first, its blocks come from the prefix cache (untimed anyway)
                runs.setdefault(("pagedllm", w, kv), []).append(statistics.mean(
                    _timed_generation(llms[(w, kv)], _prompts(1, args.context, seed=args.context), args.decode_tokens)
                    for _ in range(args.repeats)))
        print(f"round {r + 1}:", {" ".join(k): f"{v[-1]:.1f}" for k, v in runs.items()}, flush=True)
    decode = {key: statistics.median(v) for key, v in runs.items()}

    cap = {kv: capacity(llms[("bf16", kv)], args.context, args.new_tokens, stub=True) for kv in ("auto", "int8")}
    bytes_per_token = {kv: pagedllm_bytes_per_token(llms[("bf16", kv)]) for kv in ("auto", "int8")}
    tokenizer = llms[("bf16", "auto")].tokenizer
    llms.clear()
    real = {}
    for kv in ("auto", "int8"):
        small = engine(kv, memory=args.measured_memory << 20)
        real[kv] = capacity(small, args.context, args.new_tokens, stub=False)
        del small
    print("capacity:", cap, real, flush=True)
    body = report(args, isa, weights, ppl, scales, answers, tokenizer, peer_ppl, peer_bytes, decode, cap, real,
                  bytes_per_token)
    print(body)
    if not (args.quick or args.no_write):
        write_section("bench_kv_cache", body)


def report(args, isa, weights, ppl, scales, answers, tok, peer_ppl, peer_bytes, decode, cap, real, bpt) -> str:
    length = args.context + args.new_tokens
    mib = args.kv_cache_memory
    x = lambda a, b: f"**{a / b:.2f}x**"  # noqa: E731
    lines = [f"Tier: pagedllm's **{isa}** kernels (this CPU's best), llama.cpp "
             f"built with {llamacpp.DESCRIBED[llamacpp.NATIVE]}, 2 threads.\n",
             f"`python -m perf.bench_kv_cache` — SmolLM2-135M-Instruct; pagedllm's KV cache in the model's dtype "
             "(`kv_cache_dtype=\"auto\"`, bf16) against int8 codes with a bf16 scale per position and KV head "
             "(`\"int8\"`); llama.cpp "
             f"({llamacpp.SDIST} sdist) with `-fa 1` and its f16 cache against `-ctk q8_0 -ctv q8_0`.\n",
             f"Capacity: {args.context:,}-token prompts + {args.new_tokens} new tokens ({length:,} tokens) "
             f"in {mib} MiB of KV cache. Computed: whole sequences in the engine's blocks (pagedllm), or in "
             f"{mib} MiB at llama.cpp's KV bytes per token (its `llama_kv_cache: size` line for `-c 4096`). "
             "Measured: one sequence more than computed is submitted (ignore_eos, max_num_seqs 256, a token "
             "budget that starts every prompt in one step) and the engine stepped until the first wave has "
             "finished; the most that decode at once, never preempted — at "
             f"{mib} MiB with the model replaced by a stub (the engine's own scheduler, blocks and steps; no "
             f"compute), and at {args.measured_memory} MiB with the model running.\n",
             "| KV cache | bytes per token | blocks | sequences, computed | measured (stub model) | "
             f"measured with the model, {args.measured_memory} MiB | vs model dtype |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kv, name in (("auto", "pagedllm bf16 (auto)"), ("int8", "pagedllm int8")):
        c, m = cap[kv], real[kv]
        lines.append(f"| {name} | {bpt[kv]:,} | {c['num_blocks']:,} | {c['computed']} | {c['measured']} of "
                     f"{c['submitted']} (preemptions: {c['preemptions']}) | {m['measured']} of {m['computed']} "
                     f"computed, {m['submitted']} submitted (preemptions: {m['preemptions']}) | "
                     f"{x(cap[kv]['computed'], cap['auto']['computed'])} (bytes {x(bpt['auto'], bpt[kv])}) |")
    if peer_bytes:
        per_token = {kv: b for kv, (b, _) in peer_bytes.items()}
        fit = {kv: int(mib * 2 ** 20 // (b * length)) for kv, b in per_token.items()}
        for kv in ("auto", "int8"):
            lines.append(f"| llama.cpp {CACHE[kv]} | {per_token[kv]:,.0f} | - | {fit[kv]} | - | - | "
                         f"{x(fit[kv], fit['auto'])} (bytes {x(per_token['auto'], per_token[kv])}) |")
        if peer_bytes["int8"][1]:
            lines.append("\nllama.cpp's log for q8_0: `attn_rot_k = 1`, `attn_rot_v = 1`: it applies a Hadamard "
                         "rotation to keys and values before quantizing them (off for f16); pagedllm does not.")
    lines += ["", f"Batch-1 decode at a {args.context:,}-token context, tokens/s: {args.decode_tokens} new tokens "
              f"after a {args.context:,}-token prompt (`llama-bench -p 0 -n {args.decode_tokens} -d {args.context} "
              "-fa 1 -ctk/-ctv`), "
              f"medians of {args.rounds} alternating rounds (pagedllm: each the mean of {args.repeats} runs of the "
              "same prompt, its blocks from the prefix cache after the first; llama-bench: `-r 3`).\n",
              "| weights | pagedllm kv auto | kv int8 | int8 / auto | llama.cpp f16 | q8_0 | q8_0 / f16 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for w in weights:
        ours = [decode[("pagedllm", w, kv)] for kv in ("auto", "int8")]
        theirs = ([f"{decode[('llama.cpp', w, kv)]:.1f}" for kv in ("auto", "int8")] +
                  [x(decode[("llama.cpp", w, "int8")], decode[("llama.cpp", w, "auto")])]
                  if ("llama.cpp", w, "auto") in decode else ["-"] * 3)
        lines.append(f"| {w} ({PEER[w][1]}) | {ours[0]:.1f} | {ours[1]:.1f} | {x(ours[1], ours[0])} | "
                     + " | ".join(theirs) + " |")
    for crash in args.peer_crashes:
        lines.append(f"\nllama.cpp left out for those weights: {crash} (its native build on this CPU).")
    lines += ["", "Perplexity of perf/data/perplexity.txt: pagedllm in windows of 512 tokens, every position scored; "
              f"llama-perplexity `-c {args.peer_window}` (the text has about 1,000 tokens, under the 1,024 `-c 512` "
              "needs), the second half of each window scored, so only its change is comparable.\n",
              "| weights | pagedllm kv auto | kv int8 | change | llama.cpp f16 | q8_0 | change |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for w in weights:
        a, b = ppl[(w, "auto")], ppl[(w, "int8")]
        theirs = "- | - | -"
        if (w, "auto") in peer_ppl:
            f16, q8 = peer_ppl[(w, "auto")], peer_ppl[(w, "int8")]
            theirs = f"{f16:.4f} | {q8:.4f} | {q8 / f16 - 1:+.2%}"
        lines.append(f"| {w} ({PEER[w][1]}) | {a:.4f} | {b:.4f} | {b / a - 1:+.2%} | {theirs} |")
    lines += ["", "Scale granularity (torch backend, float32 model and cache): the shipped cache (a scale per "
              "position and KV head) against a simulated one scale per 16-position block and KV head (the block's "
              "largest |x| / 127 over its final contents, rounded up to bf16 as kv_quant does), the cache's write "
              "wrapped in this script; the simulated per-position row must equal the shipped one. Relative RMS "
              "error of the dequantized keys and values over the text's real K/V, every layer.\n",
              "| scales | perplexity | vs unquantized | K rel. RMS error | V rel. RMS error |",
              "|---|---:|---:|---:|---:|"]
    base = scales["none (float32 cache)"][0]
    for name, (p, k, v) in scales.items():
        err = f"{k:.2%} | {v:.2%}" if k is not None else "- | -"
        lines.append(f"| {name} | {p:.4f} | {p / base - 1:+.3%} | {err} |")
    tok_row, blk_row = scales["per position & head (shipped int8)"], scales["per 16-position block & head (simulated)"]
    nearer = "per position" if abs(tok_row[0] - base) <= abs(blk_row[0] - base) else "per block"
    smaller = "per position" if tok_row[1] + tok_row[2] <= blk_row[1] + blk_row[2] else "per block"
    lines.append(f"\nNearer the unquantized perplexity: **{nearer}**; smaller K/V error: **{smaller}**.")
    lines += ["", "Greedy answers to the chat prompts (48 tokens), kv auto against int8:\n",
              "| prompt | bf16 weights, kv auto | kv int8 | first difference |"
              + (" int8 weights: first difference |" if "int8" in weights else ""),
              "|---|---|---|---|" + ("---|" if "int8" in weights else "")]
    for i, q in enumerate(CHATS):
        a, b = answers[("bf16", "auto")][i], answers[("bf16", "int8")][i]
        cells = [tok.decode(a), tok.decode(b)]
        diffs = [first_difference(answers[(w, "auto")][i], answers[(w, "int8")][i]) for w in weights]
        lines.append(f"| {q} | {cells[0]!r} | {cells[1]!r} | "
                     + " | ".join("identical" if d is None else f"token {d}" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
