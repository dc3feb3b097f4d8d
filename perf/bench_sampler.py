"""What sampling costs: decode throughput at batch 1 and 32 with each sampling mode against greedy, on the same
prompts in one process (rounds alternate the modes; medians of the per-round ratios), and the sampler's own
time per step. Every request runs to max_tokens (ignore_eos), so each mode makes as many steps.

    python -m perf.bench_sampler           # writes perf/RESULTS.md
    python -m perf.bench_sampler --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time

from pagedllm import LLM, SamplingParams
from perf.results import write_section
from perf.workloads import QUESTIONS

MODES = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8": {"temperature": 0.8},
    "top-k 40": {"temperature": 0.8, "top_k": 40},
    "top-p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "min-p 0.05": {"temperature": 0.8, "min_p": 0.05},
    "top-k 40 + top-p 0.95 + min-p 0.05": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05},
}


class SamplerClock:
    """Wraps the engine's sampler: seconds spent in it and the steps it ran."""

    def __init__(self, engine) -> None:
        self.inner, self.seconds, self.steps = engine.sampler, 0.0, 0
        engine.sampler = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.steps += 1


def run(llm: LLM, clock: SamplerClock, prompts: list[list[int]], params: SamplingParams) -> tuple[float, float]:
    """(output tokens/s, sampler ms per step)."""
    clock.seconds, clock.steps = 0.0, 0
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / secs, clock.seconds / max(1, clock.steps) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny run; does not touch RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.max_tokens, args.rounds = [1, 4], 4, 1
    llm = LLM(kv_cache_memory=256 << 20)
    clock = SamplerClock(llm.engine)
    chats = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS * 8]
    rows = []
    for batch in args.batches:
        prompts = chats[:batch]
        params = {name: SamplingParams(**mode, seed=None, max_tokens=args.max_tokens, ignore_eos=True)
                  for name, mode in MODES.items()}
        run(llm, clock, prompts, params["greedy"])  # warm
        rates: dict[str, list[float]] = {name: [] for name in MODES}
        sampler: dict[str, list[float]] = {name: [] for name in MODES}
        for _ in range(args.rounds):
            for name in MODES:
                rate, ms = run(llm, clock, prompts, params[name])
                rates[name].append(rate)
                sampler[name].append(ms)
        for name in MODES:
            ratio = statistics.median(r / g for r, g in zip(rates[name], rates["greedy"]))
            rows.append((batch, name, statistics.median(rates[name]), ratio, statistics.median(sampler[name])))
    body = report(args, rows)
    print(body)
    if not args.quick:
        write_section("bench_sampler", body)


def report(args, rows) -> str:
    lines = [f"`python -m perf.bench_sampler` — SmolLM2-135M-Instruct, bfloat16, chat prompts, {args.max_tokens} "
             f"tokens each (ignore_eos), {args.rounds} rounds alternating the modes; medians. The ratio is the "
             "mode's throughput over greedy's in the same round (1.00x: sampling costs nothing; the goal is "
             "at least 0.95x).\n",
             "| batch | sampling | output tok/s | vs greedy | sampler ms / step |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {batch} | {name} | {rate:.0f} | {ratio:.2f}x | {ms:.2f} |" for batch, name, rate, ratio, ms in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
