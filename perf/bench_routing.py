"""Cache-aware routing against least-outstanding: two tritonserver replicas on this machine, one core and one
thread each, behind two gateways (one per policy) that take turns on the same workloads.

    python -m perf.bench_routing            # 2 alternating rounds of every workload; writes RESULTS.md
    python -m perf.bench_routing --quick    # a smoke run; does not touch RESULTS.md

Each replica's KV cache (--kv-cache-mib, 256 MiB) holds about seven of the eight tenants' system prompts:
together the two hold them all, apart neither does, which is where a router earns its keep.

Workloads (greedy, ignore_eos; every round uses prompts of its own, so no run finds another's blocks cached):
  tenants    8 tenants, each with its own ~1,500-token system prompt, short questions, Poisson arrivals; each
             tenant's first request is sent (and waited for) before the measured ones: a steady state, not
             the cold start of every tenant at once
  multiturn  chats that grow: each turn adds the answer and a paragraph-long question, think time between turns
  unique     no shared prefixes: distinct ~300-token prompts at a fixed concurrency
Reported per workload and policy: p50/p90 time to first token (medians over rounds), output tokens/s, the
prefix-cache hit rate over both replicas (their own metrics, measured requests only), and each replica's
outstanding requests as the gateway counts them, sampled every 0.2 s. The tenants workload also runs once on one
replica alone with both replicas' cache memory and both cores, for the hit rate one cache of that size achieves."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.engine.config import declared_model_path
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.launcher import ServerOptions, TritonServer, free_port
from pagedllm.serving.repository import write_llm
from perf.loadgen import OpenAIClient
from perf.results import write_section
from perf.workloads import PASSAGE, QUESTIONS, SYSTEM_POLICY

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "perf" / "out"
POLICIES = ("cache-aware", "least-outstanding")
WORDS = ("river harbour ledger invoice meadow quartz signal lantern orbit canyon velvet ember tundra prism cobalt "
         "saddle walnut falcon glacier marble pepper cedar thistle beacon anchor").split()


@dataclass
class Run:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed: float = 0.0
    errors: int = 0
    hit_rate: float = 0.0
    outstanding: list[tuple[int, ...]] = field(default_factory=list)  # samples: each replica's in-flight count


# ---- workloads: lists of (request body, delay before it) ----------------------------------------------------------
def tenant_system(tag: str, tenant: int, tokens: int, tokenizer) -> str:
    head = f"[{tag}] You are the assistant of tenant {tenant}, company {WORDS[tenant % len(WORDS)].title()} " \
           f"{tenant * 7919 % 1000}. "
    per = len(tokenizer.encode(SYSTEM_POLICY))
    return head + SYSTEM_POLICY * max(1, round(tokens / per))


def tenants_work(tag: str, tokenizer, n_tenants: int, per_tenant: int, system_tokens: int, rate: float,
                 max_tokens: int, seed: int) -> list[tuple[dict, float]]:
    rng = random.Random(seed)
    systems = [tenant_system(tag, t, system_tokens, tokenizer) for t in range(n_tenants)]
    order = [t for t in range(n_tenants) for _ in range(per_tenant)]
    rng.shuffle(order)
    return [({"messages": [{"role": "system", "content": systems[t]},
                           {"role": "user", "content": rng.choice(QUESTIONS)}],
              "max_tokens": max_tokens, "user": f"tenant-{t}"}, rng.expovariate(rate)) for t in order]


def first_of_each_tenant(work: list[tuple[dict, float]]) -> list[dict]:
    firsts: dict[str, dict] = {}
    for body, _ in work:
        firsts.setdefault(body["user"], body)
    return list(firsts.values())


def unique_work(tag: str, n: int, words: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    texts = [f"[{tag}-{i}] " + " ".join(rng.choice(WORDS) for _ in range(words)) + " " + rng.choice(QUESTIONS)
             for i in range(n)]
    return [{"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens} for text in texts]


# ---- driving the gateway -----------------------------------------------------------------------------------------
async def one(client: OpenAIClient, body: dict, run: Run) -> str:
    body = dict(body)
    messages = body.pop("messages")
    try:
        c = await client.generate(messages, temperature=0, ignore_eos=True, **body)
    except Exception:  # noqa: BLE001 (counted; the run goes on)
        run.errors += 1
        return ""
    if c.time_to_first_token is not None:
        run.ttfts.append(c.time_to_first_token)
    run.tokens += c.num_output_tokens
    return c.text


async def open_loop(url: str, work: list[tuple[dict, float]], run: Run) -> None:
    async with OpenAIClient(url, "llm") as client:
        tasks = []
        for body, gap in work:
            tasks.append(asyncio.create_task(one(client, body, run)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks)


async def conversations(url: str, tag: str, n: int, turns: int, max_tokens: int, think: float, seed: int,
                        run: Run) -> None:
    rng = random.Random(seed)
    async with OpenAIClient(url, "llm") as client:
        async def chat(i: int) -> None:
            own = random.Random(seed * 1000 + i)
            await asyncio.sleep(own.uniform(0, think * 2))
            messages = [{"role": "system", "content": f"[{tag}-{i}] You are a patient tutor. " + SYSTEM_POLICY}]
            for _ in range(turns):
                words = PASSAGE.split()
                start = own.randrange(len(words) // 2)
                messages.append({"role": "user", "content": " ".join(words[start:start + 80]) + " "
                                 + own.choice(QUESTIONS)})
                answer = await one(client, {"messages": list(messages), "max_tokens": max_tokens,
                                            "user": f"{tag}-{i}"}, run)
                messages.append({"role": "assistant", "content": answer})
                await asyncio.sleep(own.expovariate(1 / think))
        await asyncio.gather(*(chat(i) for i in range(n)))
    del rng


async def closed_loop(url: str, work: list[dict], concurrency: int, run: Run) -> None:
    queue = list(reversed(work))
    async with OpenAIClient(url, "llm") as client:
        async def worker() -> None:
            while queue:
                await one(client, queue.pop(), run)
        await asyncio.gather(*(worker() for _ in range(concurrency)))


# ---- replicas, gateways, metrics ---------------------------------------------------------------------------------
def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def prefix_counts(servers: list[TritonServer]) -> tuple[float, float]:
    """(prompt tokens looked up, tokens found) in the prefix caches of all `servers`."""
    def total(body: str, name: str) -> float:
        return sum(float(v) for v in re.findall(rf'^{name}\{{[^}}]*model="llm"[^}}]*\}} (\S+)', body, re.M))
    bodies = [scrape(server.metrics_url) for server in servers]
    return (sum(total(b, "pagedllm_prefix_cache_queries_total") for b in bodies),
            sum(total(b, "pagedllm_prefix_cache_hits_total") for b in bodies))


def in_flight(gateway_url: str, servers: list[TritonServer]) -> tuple[int, ...]:
    body = scrape(f"{gateway_url}/metrics")
    counts = []
    for server in servers:
        found = re.search(rf'^pagedllm_gateway_in_flight_requests\{{replica="{re.escape(server.grpc_url)}"\}} (\S+)',
                          body, re.M)
        counts.append(int(float(found.group(1))) if found else 0)
    return tuple(counts)


def measured(gateway_url: str, servers: list[TritonServer], body, warm_up: list[dict] = ()) -> Run:
    """Runs `body(run)` (a coroutine function) and fills in the run's time, hit rate and load samples, after the
    `warm_up` requests (two at a time, not measured)."""
    if warm_up:
        asyncio.run(closed_loop(f"{gateway_url}/v1", list(warm_up), 2, Run()))
    run, stop = Run(), threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(OSError):
                run.outstanding.append(in_flight(gateway_url, servers))
    sampler = threading.Thread(target=sample, daemon=True)
    q0, h0 = prefix_counts(servers)
    sampler.start()
    start = time.perf_counter()
    asyncio.run(body(run))
    run.elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    time.sleep(1.5)  # the servers' metrics catch up with the last step
    q1, h1 = prefix_counts(servers)
    run.hit_rate = (h1 - h0) / max(1.0, q1 - q0)
    return run


def start_gateway(name: str, urls: list[str], policy: str, tokenizer: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "pagedllm.cli", "gateway", "--port", str(port), "--model", "llm",
               "--routing", policy, "--tokenizer", f"llm={tokenizer}"]
    for url in urls:
        command += ["--triton", url]
    log = open(OUT / f"bench_routing-{name}.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.5)
    raise RuntimeError(f"gateway {name} did not become ready; see {log.name}")


def start_replica(name: str, engine: dict, core: int | None) -> TritonServer:
    """A tritonserver with one `llm` model, its engine on one thread pinned to `core` (its processes inherit),
    or on every core with `core` None."""
    repo = OUT / f"bench_routing-{name}"
    write_llm(repo, "llm", engine)
    everyone = os.sched_getaffinity(0)
    if core is not None:
        os.environ["OMP_NUM_THREADS"] = "1"
        os.sched_setaffinity(0, {core})
    try:
        return TritonServer(ServerOptions(repo, free_port(), free_port(), free_port()),
                            OUT / f"bench_routing-{name}-tritonserver.log").start_ready(600)
    finally:
        os.sched_setaffinity(0, everyone)
        os.environ.pop("OMP_NUM_THREADS", None)


# ---- report ------------------------------------------------------------------------------------------------------
def p(values: list[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def imbalance(samples: list[tuple[int, ...]]) -> tuple[list[float], int, float]:
    """(each replica's mean outstanding, the largest gap seen, share of samples where one replica had more than
    2x the other's plus 4: the gateway's bound, RoutingConfig)."""
    if not samples:
        return [], 0, 0.0
    means = [statistics.fmean(s[i] for s in samples) for i in range(len(samples[0]))]
    gap = max(max(s) - min(s) for s in samples)
    beyond = sum(max(s) > 2 * min(s) + 4 for s in samples) / len(samples)
    return means, gap, beyond


def report(results: dict[str, dict[str, list[Run]]], single: Run | None, args: argparse.Namespace) -> str:
    lines = [f"Two replicas (SmolLM2-135M, the shipped engine.json but a {args.kv_cache_mib} MiB KV cache, one core "
             f"and one engine thread each) behind one gateway per policy; {args.rounds} rounds, the policies "
             f"alternating which goes first; medians over rounds. tenants: {args.tenants} tenants x "
             f"{args.per_tenant} requests after one each unmeasured, ~{args.system_tokens}-token system prompts, "
             f"Poisson {args.rate}/s, {args.max_tokens} tokens out. multiturn: {args.chats} chats x "
             f"{args.turns} turns, +~100 tokens a turn, think time {args.think} s. unique: {args.unique} distinct "
             f"~{args.words}-word prompts, {args.concurrency} in flight.", "",
             "| workload | routing | TTFT p50 s | TTFT p90 s | p90 vs least-outstanding | tok/s "
             "| prefix-cache hit rate | mean outstanding per replica | largest gap | samples beyond 2x+4 "
             "| errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for workload, by_policy in results.items():
        base_p90 = statistics.median(p(r.ttfts, 90) for r in by_policy["least-outstanding"])
        for policy, runs in by_policy.items():
            p90 = statistics.median(p(r.ttfts, 90) for r in runs)
            imb = [imbalance(r.outstanding) for r in runs]
            lines.append(f"| {workload} | {policy} | {statistics.median(p(r.ttfts, 50) for r in runs):.3f} | "
                         f"{p90:.3f} | {base_p90 / p90:.2f}x lower | "
                         f"{statistics.median(r.tokens / r.elapsed for r in runs):.1f} | "
                         f"{statistics.median(r.hit_rate for r in runs):.1%} | "
                         f"{' / '.join(f'{statistics.median(m):.2f}' for m in zip(*(i[0] for i in imb)))} | "
                         f"{max(i[1] for i in imb)} | "
                         f"{max(i[2] for i in imb):.1%} | {sum(r.errors for r in runs)} |")
    if single is not None:
        lines += ["", f"The tenants workload on one replica alone, with both replicas' KV memory and both cores: "
                      f"prefix-cache hit rate {single.hit_rate:.1%}, TTFT p90 {p(single.ttfts, 90):.3f} s."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, list[Run]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.6))
    for ax, (workload, by_policy) in zip(axes, results.items()):
        for policy, runs in by_policy.items():
            values = sorted(t for r in runs for t in r.ttfts)
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=policy)
        ax.set_xscale("log")
        ax.set_title(workload)
        ax.set_xlabel("time to first token (s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of requests")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="each replica's kv_cache_memory")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--per-tenant", type=int, default=30)
    ap.add_argument("--system-tokens", type=int, default=1500)
    ap.add_argument("--rate", type=float, default=2.0, help="tenants workload: requests/s, Poisson")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--chats", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--think", type=float, default=3.0)
    ap.add_argument("--unique", type=int, default=48)
    ap.add_argument("--words", type=int, default=250)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="tiny run for CI; does not touch RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.tenants, args.per_tenant, args.system_tokens = 1, 2, 2, 100
        args.chats, args.turns, args.unique, args.max_tokens, args.rate = 2, 2, 4, 4, 4.0
    OUT.mkdir(parents=True, exist_ok=True)
    shipped = json.loads((args.model_repository / "llm" / "1" / "engine.json").read_text())
    engine = {**shipped, "kv_cache_memory": args.kv_cache_mib << 20}
    tokenizer_dir = declared_model_path(args.model_repository / "llm")
    tokenizer = load_tokenizer(tokenizer_dir)
    cores = sorted(os.sched_getaffinity(0))
    servers = [start_replica(name, engine, cores[i % len(cores)] if len(cores) > 1 else None)
               for i, name in enumerate("ab")]
    gateways = {policy: start_gateway(policy, [s.grpc_url for s in servers], policy, tokenizer_dir)
                for policy in POLICIES}
    for server in servers:  # the first requests of an engine pay for its warm-up, not for routing
        warm, warm_url = start_gateway(f"warm-{server.opts.grpc_port}", [server.grpc_url], "least-outstanding",
                                       tokenizer_dir)
        asyncio.run(closed_loop(f"{warm_url}/v1", unique_work("warm", 4, args.words, 8, seed=7), 2, Run()))
        warm.terminate()
    results: dict[str, dict[str, list[Run]]] = {w: {policy: [] for policy in POLICIES}
                                                 for w in ("tenants", "multiturn", "unique")}
    try:
        for r in range(args.rounds):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for policy in order:
                url = gateways[policy][1]
                tag = f"r{r}-{policy}"
                work = tenants_work(tag, tokenizer, args.tenants, args.per_tenant, args.system_tokens, args.rate,
                                    args.max_tokens, seed=r)
                results["tenants"][policy].append(measured(url, servers, lambda run, w=work, u=url:
                                                           open_loop(f"{u}/v1", w, run), first_of_each_tenant(work)))
                results["multiturn"][policy].append(measured(url, servers, lambda run, t=tag, u=url, s=r: conversations(
                    f"{u}/v1", t, args.chats, args.turns, args.max_tokens * 2, args.think, s, run)))
                work = unique_work(tag, args.unique, args.words, args.max_tokens * 2, seed=r)
                results["unique"][policy].append(measured(url, servers, lambda run, w=work, u=url:
                                                          closed_loop(f"{u}/v1", w, args.concurrency, run)))
                print(policy, {w: (round(p(v[policy][-1].ttfts, 90), 3), v[policy][-1].errors)
                               for w, v in results.items()}, flush=True)
    finally:
        for process, _ in gateways.values():
            process.terminate()
        for server in servers:
            server.stop()
    # one replica alone with the cache memory of both, for the hit rate one cache of that size reaches
    big = start_replica("single", {**engine, "kv_cache_memory": 2 * engine["kv_cache_memory"]}, None)
    alone, alone_url = start_gateway("single", [big.grpc_url], "least-outstanding", tokenizer_dir)
    try:
        work = tenants_work("single", tokenizer, args.tenants, args.per_tenant, args.system_tokens, args.rate,
                            args.max_tokens, seed=99)
        single = measured(alone_url, [big], lambda run: open_loop(f"{alone_url}/v1", work, run),
                          first_of_each_tenant(work))
    finally:
        alone.terminate()
        big.stop()
    body = report(results, single, args)
    print(body)
    if not args.quick:
        plot(results, ROOT / "perf" / "routing.png")
        write_section("bench_routing", body + "\n![time to first token by routing policy](routing.png)\n")


if __name__ == "__main__":
    main()
