"""Served throughput at fixed concurrency through each path vs the offline engine on the same workload.

    python -m perf.bench_serving               # 32 requests x 128 tokens, all 32 in flight, 10 rounds
    python -m perf.bench_serving --quick       # a smoke run (CI)
    python -m perf.bench_serving --quick --server localhost:8001,localhost:8000   # ... on a running server

Every path serves the same requests (chat prompts, greedy, ignore_eos, max_tokens fixed) with the same
number in flight, sent by perf/loadgen.py's client; the offline engine is LLMEngine driven in-process with
the same engine.json. The paths take turns, round after round, with an offline run between any two served
runs; each served run is divided by the mean of the offline runs just before and after it, and the median
of those ratios is reported: this machine's speed drifts by a quarter within minutes, so only figures taken
seconds apart are comparable, and many short runs give a steadier median than a few long ones. One more
path serves the same engine.json with another `stream_interval` (every token, by default)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from pagedllm import SamplingParams
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.launcher import ServerOptions, TritonServer, free_port
from pagedllm.serving.repository import write_llm
from perf.cpu_time import cpu_by_role, server_processes
from perf.loadgen import at_concurrency
from perf.results import write_section
from perf.workloads import chat_prompts

ROOT = Path(__file__).resolve().parent.parent

OFFLINE = "offline engine (LLMEngine in-process)"
ENGINE, LOAD_GENERATOR = "engine processes", "load generator"
ROLES = (ENGINE, "Python stubs", "tritonserver", LOAD_GENERATOR)


@dataclass
class RunningServer:
    grpc_url: str
    http_url: str


@dataclass
class Run:
    rate: float  # output tokens/s
    cpu: dict[str, float]  # CPU-seconds per 1,000 output tokens, by process role


def offline(engine: LLMEngine, chats: list, max_tokens: int, concurrency: int) -> Run:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [engine.apply_chat_template(c) for c in chats]
    pending, produced, start, cpu = list(enumerate(prompts)), 0, time.perf_counter(), own_cpu_seconds()
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
            in_flight += 1
        for delta in engine.step():
            produced += len(delta.new_token_ids)
            in_flight -= delta.finished
    return Run(produced / (time.perf_counter() - start), {ENGINE: (own_cpu_seconds() - cpu) / produced * 1000})


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def served(protocol: str, url: str, model: str, chats: list, max_tokens: int, concurrency: int,
           server: dict[str, list[int]] | None = None) -> Run:
    """Through perf/loadgen.py's client; `server`: the server's processes by role, whose CPU is counted."""
    before, client = cpu_by_role(server or {}), own_cpu_seconds()
    records, elapsed = asyncio.run(at_concurrency(url, model, [(c, max_tokens) for c in chats], concurrency, protocol))
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    tokens = sum(r.tokens for r in records)
    used = {role: cpu - before[role] for role, cpu in cpu_by_role(server or {}).items()}
    used[LOAD_GENERATOR] = own_cpu_seconds() - client
    return Run(tokens / elapsed, {role: cpu / tokens * 1000 for role, cpu in used.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--stream-interval", type=int, default=1, help="of the extra llm path (engine.json's otherwise)")
    ap.add_argument("--quick", action="store_true", help="tiny run for CI; does not touch RESULTS.md")
    ap.add_argument("--server", metavar="GRPC_HOST:PORT,HTTP_HOST:PORT",
                    help="a running tritonserver serving --model-repository, in place of starting one (with --quick)")
    args = ap.parse_args()
    if args.server and not args.quick:
        ap.error("--server: only with --quick (a measured run starts its own server, with the extra model)")
    if args.quick:
        args.concurrency, args.num_requests, args.max_tokens, args.rounds = 2, 2, 4, 1
    chats = chat_prompts(args.num_requests)
    engine_json = args.model_repository / "llm" / "1" / "engine.json"
    work = (chats, args.max_tokens, args.concurrency)
    engine = LLMEngine(EngineConfig.from_json(engine_json))
    runs: dict[str, list[Run]] = {OFFLINE: []}
    ratios: dict[str, list[float]] = {}
    settings = json.loads(engine_json.read_text())
    shipped = settings.get("stream_interval", 1)
    chunked = f"llm_stream_interval_{args.stream_interval}"
    extra = ROOT / "perf" / "out" / "bench_serving-models"
    write_llm(extra, chunked, {**settings, "stream_interval": args.stream_interval})
    # --quick leaves the extra model out: loading a second engine is most of a smoke run's time
    opts = ServerOptions(args.model_repository.resolve(), free_port(), free_port(), free_port(),
                         extra_args=[] if args.quick else [f"--model-repository={extra}"])
    running = RunningServer(*args.server.split(",")) if args.server else None
    with contextlib.nullcontext(running) if running else TritonServer(
            opts, ROOT / "perf" / "out" / "bench_serving-tritonserver.log") as server:
        processes = None if running else server_processes(server.process.pid)
        served("grpc", server.grpc_url, "ensemble", chats[:2], 4, 2)  # warm-up
        paths = {"gRPC streaming, ensemble": ("grpc", server.grpc_url, "ensemble"),
                 "gRPC streaming, llm": ("grpc", server.grpc_url, "llm"),
                 "HTTP generate_stream, ensemble": ("http", server.http_url, "ensemble"),
                 f"gRPC streaming, llm, stream_interval {args.stream_interval}": ("grpc", server.grpc_url, chunked)}
        if args.quick:
            paths.popitem()
        before = offline(engine, *work)
        runs[OFFLINE].append(before)
        for _ in range(args.rounds):
            for name, (protocol, url, model) in paths.items():
                run = served(protocol, url, model, *work, processes)
                after = offline(engine, *work)
                runs[OFFLINE].append(after)
                runs.setdefault(name, []).append(run)
                ratios.setdefault(name, []).append(run.rate / ((before.rate + after.rate) / 2))
                before = after
    body = report(runs, ratios, args, shipped)
    print(body)
    if not args.quick:
        write_section("bench_serving", body)


def report(runs: dict[str, list[Run]], ratios: dict[str, list[float]], args: argparse.Namespace,
           shipped: int) -> str:
    rows = []
    for name, path_runs in runs.items():
        rates = [r.rate for r in path_runs]
        cpu = [f"{statistics.median(r.cpu[role] for r in path_runs):.2f}" if role in path_runs[0].cpu else ""
               for role in ROLES]
        shown = "**1.00**"  # the offline runs themselves
        if name in ratios:
            shown = f"**{statistics.median(ratios[name]):.2f}** ({', '.join(f'{r:.2f}' for r in ratios[name])})"
        rows.append(f"| {name} | {statistics.median(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} | {shown} | "
                    + " | ".join(cpu) + " |")
    return (f"`python -m perf.bench_serving` — SmolLM2-135M-Instruct (model_repository/llm/1/engine.json), "
            f"{args.num_requests} chat requests x {args.max_tokens} tokens, greedy, {args.concurrency} in flight, "
            f"{args.rounds} rounds in which the paths take turns with an offline run between any two; each served run "
            f"is divided by the mean of the offline runs just before and after it, and the median of those ratios "
            f"is shown (each round's in brackets). The load generator (perf/loadgen.py's asyncio client, one thread) "
            f"shares the machine's {os.cpu_count()} cores with the server. engine.json as shipped streams a response "
            f"every {shipped} tokens (`stream_interval` {shipped}); the last path is the same engine with "
            f"`stream_interval` {args.stream_interval}. CPU-seconds per 1,000 output tokens, medians, read from /proc "
            f"for each process of the server (the engine processes of every llm model loaded, the idle one's "
            f"included) and from the load generator's own usage; the offline engine's is that process's own.\n\n"
            f"| path | output tok/s (median) | range | vs offline, adjacent runs | "
            + " | ".join(f"CPU-s/1k tokens: {role}" for role in ROLES) + " |\n"
            "|---|---:|---:|---:|" + "---:|" * len(ROLES) + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
