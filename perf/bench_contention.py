"""What another process's CPU costs the engine: offline throughput alone and beside a process that takes a
share of one core in short bursts, as a server's stubs, tritonserver and a co-located client do.

    python -m perf.bench_contention                  # bursts of 1 ms every 10 ms (a tenth of a core), 5 pairs
    python -m perf.bench_contention --busy-ms 2 --period-ms 10
    python -m perf.bench_contention --quick          # a smoke run (CI)

The engine's threads meet at a barrier after every op, so a thread preempted by the other process holds up
the rest: the throughput lost is compared with the share of the machine the other process took. Runs alone
and beside it alternate (this machine's speed drifts); medians are reported."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from perf.bench_serving import offline
from perf.cpu_time import cpu_seconds
from perf.results import write_section
from perf.workloads import chat_prompts

ROOT = Path(__file__).resolve().parent.parent
BURNER = """
import sys, time
busy, period = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < busy:
        pass
    time.sleep(period - busy)
"""


def beside_burner(run, busy_ms: float, period_ms: float) -> tuple[float, float]:
    """(run()'s result, cores the burner took while it ran)."""
    burner = subprocess.Popen([sys.executable, "-c", BURNER, str(busy_ms), str(period_ms)])
    try:
        time.sleep(0.2)  # past its start-up
        start, cpu = time.perf_counter(), cpu_seconds(burner.pid)
        result = run()
        return result, (cpu_seconds(burner.pid) - cpu) / (time.perf_counter() - start)
    finally:
        burner.kill()
        burner.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy-ms", type=float, default=1.0)
    ap.add_argument("--period-ms", type=float, default=10.0)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny run for CI; does not touch RESULTS.md")
    args = ap.parse_args()
    requests, max_tokens = (32, 128) if not args.quick else (2, 4)
    pairs = 1 if args.quick else args.pairs
    engine = LLMEngine(EngineConfig.from_json(ROOT / "model_repository" / "llm" / "1" / "engine.json"))
    work = (chat_prompts(requests), max_tokens, requests)
    offline(engine, *work)  # warm-up
    alone, beside, taken = [], [], []
    for _ in range(pairs):
        alone.append(offline(engine, *work).rate)
        run, cores = beside_burner(lambda: offline(engine, *work), args.busy_ms, args.period_ms)
        beside.append(run.rate)
        taken.append(cores)
    share = statistics.median(taken) / os.cpu_count()
    kept = statistics.median(b / a for a, b in zip(alone, beside))
    body = (f"`python -m perf.bench_contention` — the offline engine (model_repository/llm/1/engine.json), {requests} "
            f"chat requests x {max_tokens} tokens, all in flight, alone and beside a process that spins "
            f"{args.busy_ms:g} ms every {args.period_ms:g} ms; {pairs} alternating pairs of runs, medians.\n\n"
            f"| run | output tok/s | |\n|---|---:|---:|\n"
            f"| alone | {statistics.median(alone):.0f} | 1.00 |\n"
            f"| beside the other process | {statistics.median(beside):.0f} | **{kept:.2f}** |\n\n"
            f"The other process took {statistics.median(taken):.2f} cores, {share:.1%} of the machine's "
            f"{os.cpu_count()}; the engine lost {1 - kept:.1%} of its throughput "
            f"({(1 - kept) / share if share else 0:.1f}x that share).\n")
    print(body)
    if not args.quick:
        write_section("bench_contention", body)


if __name__ == "__main__":
    main()
