"""Start-up: seconds from a new process to the first token, offline (`LLM()`) and served (`pagedllm serve`),
cold and warm.

    python -m perf.bench_startup                  # 3 rounds, written to perf/RESULTS.md
    python -m perf.bench_startup --rounds 1 --no-write

Cold: an empty PAGEDLLM_CACHE, so the start converts the embedded model from its package and builds the CPU
kernels for this machine (and the served one Triton's backend shim), as a user's first run after install does;
warm: the same start again on that cache. The files read stay in the OS page cache between runs (this script
cannot drop it), so "cold" is the first start of an install, not the first after a reboot. Cold and warm take
turns within a round; medians are reported."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pagedllm.launcher import free_port
from pagedllm_client import Client
from perf.results import write_section

ROOT = Path(__file__).resolve().parent.parent
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Runs in the measured process: seconds from its start to `import pagedllm` done, to LLM() built, and to the
# first token of a one-token answer, as `imports llm first` on one line.
OFFLINE = """
import sys, time
start = float(sys.argv[1])
from pagedllm import LLM, SamplingParams
imported = time.time()
llm = LLM(cpu_isa=sys.argv[2])
built = time.time()
llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1), use_tqdm=False)
print(imported - start, built - start, time.time() - start)
"""


@dataclass
class Start:
    ready: float        # seconds from the process's start: `LLM()` returned, or the server said it is ready
    first_token: float  # ... to the first token of the first answer
    imports: float = 0.0  # ... to `import pagedllm` done (offline)


def offline_start(cache: Path, isa: str = "auto") -> Start:
    """`LLM()` in a new process on `cache` (imports included, as a script's user waits for them)."""
    env = {**os.environ, "PAGEDLLM_CACHE": str(cache)}
    out = subprocess.run([sys.executable, "-c", OFFLINE, repr(time.time()), isa], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    imported, built, first = map(float, out[-3:])
    return Start(built, first, imported)


def served_start(cache: Path) -> Start:
    """`pagedllm serve` in a new process on `cache`: until it prints that it is ready, then until the first
    streamed token of a chat through the ensemble over gRPC; stopped afterwards."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "PAGEDLLM_CACHE": str(cache)}
    command = [sys.executable, "-m", "pagedllm.cli", "serve", "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics)]
    start = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        for line in server.stdout:
            if line.startswith("pagedllm ready"):
                break
        else:
            raise RuntimeError(f"pagedllm serve exited with {server.wait()} before it was ready")
        ready = time.perf_counter() - start
        with Client(f"127.0.0.1:{grpc}", model="ensemble") as client:
            next(iter(client.stream(messages=QUESTION, max_tokens=1, temperature=0)))
        return Start(ready, time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    runs: dict[tuple[str, str], list[Start]] = {}
    for r in range(args.rounds):
        for path, measure in (("LLM()", offline_start), ("pagedllm serve", served_start)):
            with tempfile.TemporaryDirectory(prefix="pagedllm-cache-") as scratch:
                os.chmod(scratch, 0o700)
                for state in ("cold", "warm"):
                    runs.setdefault((path, state), []).append(measure(Path(scratch)))
                    s = runs[path, state][-1]
                    print(f"round {r + 1}, {path} {state}: ready {s.ready:.1f} s, first token {s.first_token:.1f} s",
                          flush=True)
    body = report(args, runs)
    print(body)
    if not args.no_write:
        write_section("bench_startup", body)


def report(args, runs: dict[tuple[str, str], list[Start]]) -> str:
    rows = []
    for (path, state), starts in runs.items():
        ready = statistics.median(s.ready for s in starts)
        first = statistics.median(s.first_token for s in starts)
        rows.append(f"| {path} | {state} | {ready:.1f} | {first:.1f} |")
    return (f"`python -m perf.bench_startup` — the embedded SmolLM2-135M-Instruct, medians of {args.rounds} rounds. "
            "Seconds from a new process's start: to `LLM()` returned or the server's \"pagedllm ready\", and to "
            "the first token (offline: a one-token answer; served: the first streamed token of a chat through "
            "the ensemble over gRPC). Cold: an empty PAGEDLLM_CACHE (the model converted from its package, the "
            "kernels built for this CPU); warm: the same start again. The OS page cache stays warm in both.\n\n"
            "| start | cache | ready (s) | first token (s) |\n|---|---|---:|---:|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
