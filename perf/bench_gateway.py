"""The OpenAI gateway's cost: output tokens/s streaming through `pagedllm gateway` vs straight to `llm`
over gRPC, on one tritonserver, with the gateway's own CPU per 1,000 tokens.

    python -m perf.bench_gateway            # 64 chat requests x 128 tokens, 32 in flight, 6 rounds
    python -m perf.bench_gateway --quick    # a smoke run; does not touch RESULTS.md

Both paths serve the same requests (greedy, ignore_eos, max_tokens fixed) with the same number in flight,
sent by perf/loadgen.py (its gRPC driver, and its OpenAI driver: aiohttp and json, as light as the gRPC
one). The paths take turns, gRPC first and last; each gateway run is divided by the mean of the gRPC runs
just before and after it, and the median of those ratios is reported (this machine's speed drifts)."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pagedllm.launcher import ServerOptions, TritonServer, free_port
from perf.cpu_time import cpu_seconds
from perf.loadgen import at_concurrency
from perf.results import write_section
from perf.workloads import chat_prompts

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "perf" / "out"


def run(protocol: str, url: str, chats: list, max_tokens: int, concurrency: int) -> tuple[float, int]:
    """(output tokens/s, tokens)."""
    records, elapsed = asyncio.run(at_concurrency(url, "llm", [(c, max_tokens) for c in chats], concurrency,
                                                  protocol))
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{protocol}: {len(failed)} requests failed, first: {failed[0]}")
    tokens = sum(r.tokens for r in records)
    return tokens / elapsed, tokens


def start_gateway(grpc_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(OUT / "bench_gateway-gateway.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "pagedllm.cli", "gateway", "--triton", grpc_url,
                                "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the gateway did not become ready; see perf/out/bench_gateway-gateway.log")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.num_requests, args.max_tokens, args.rounds = 2, 2, 4, 1
    OUT.mkdir(parents=True, exist_ok=True)
    chats = chat_prompts(args.num_requests)
    work = (chats, args.max_tokens, args.concurrency)
    opts = ServerOptions((ROOT / "model_repository").resolve(), free_port(), free_port(), free_port())
    with TritonServer(opts, OUT / "bench_gateway-tritonserver.log") as server:
        gateway, base_url = start_gateway(server.grpc_url)
        try:
            rates, ratios, cpu = measure(server.grpc_url, base_url, gateway.pid, work, args.rounds)
        finally:
            gateway.terminate()
            gateway.wait(60)
    body = report(rates, ratios, cpu, args)
    print(body)
    if not args.quick:
        write_section("bench_gateway", body)


def measure(grpc_url: str, base_url: str, pid: int, work: tuple, rounds: int):
    run("grpc", grpc_url, work[0][:2], 4, 2)  # warm-up, both paths
    run("openai", base_url, work[0][:2], 4, 2)
    rates: dict[str, list[float]] = {"grpc": [], "openai": []}
    ratios, cpu_per_1k = [], []
    before, _ = run("grpc", grpc_url, *work)
    rates["grpc"].append(before)
    for _ in range(rounds):
        start = cpu_seconds(pid)
        rate, tokens = run("openai", base_url, *work)
        cpu_per_1k.append((cpu_seconds(pid) - start) / tokens * 1000)
        after, _ = run("grpc", grpc_url, *work)
        rates["openai"].append(rate)
        rates["grpc"].append(after)
        ratios.append(rate / ((before + after) / 2))
        before = after
    return rates, ratios, cpu_per_1k


def report(rates: dict[str, list[float]], ratios: list[float], cpu: list[float], args: argparse.Namespace) -> str:
    names = {"grpc": "gRPC streaming straight to `llm`", "openai": "OpenAI chat completions through the gateway"}
    rows = [f"| {names[k]} | {statistics.median(v):.0f} | {min(v):.0f}-{max(v):.0f} |" for k, v in rates.items()]
    return (f"`python -m perf.bench_gateway` — SmolLM2-135M-Instruct (model_repository as shipped), "
            f"{args.num_requests} chat requests x {args.max_tokens} tokens, greedy, {args.concurrency} streams in "
            f"flight, {args.rounds} rounds taking turns; the gateway, the load generator and tritonserver share "
            f"the machine's {os.cpu_count()} cores.\n\n"
            f"| path | output tok/s (median) | range |\n|---|---:|---:|\n" + "\n".join(rows) + "\n\n"
            "Gateway vs gRPC, each gateway run against the gRPC runs either side: "
            f"**{statistics.median(ratios):.2f}x** "
            f"({', '.join(f'{r:.2f}' for r in ratios)}). The gateway process used "
            f"**{statistics.median(cpu):.2f} CPU seconds per 1,000 output tokens** (median; "
            f"{', '.join(f'{c:.2f}' for c in cpu)}).\n")


if __name__ == "__main__":
    main()
