"""An LLM load generator over gRPC streaming: time to first token, inter-token latency and end-to-end
latency (p50/p95/p99), requests/s and output tokens/s, at fixed concurrency levels and at Poisson arrival
rates, over a realistic prompt-length mix. Writes CSV, a markdown table and PNG plots.

    python -m perf.loadgen --url localhost:8001 --models llm,ensemble --concurrency 1,8,32 --rates 2,4
    python -m perf.loadgen --quick --url localhost:8001 --models llm     # a smoke run (CI)
    python -m perf.loadgen --protocol openai --url http://localhost:9000/v1 --models llm   # any OpenAI server

Every request is greedy with ignore_eos, so each system produces exactly the tokens asked for."""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pagedllm_client import AsyncClient, Chunk, ClientError, Completion, ServerError
from perf.workloads import mixed_workload

OUT = Path(__file__).resolve().parent / "out"
Work = list[tuple[list[dict[str, str]], int]]


@dataclass
class Record:
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    itls: list[float] = field(default_factory=list)
    error: str | None = None


async def send(client: AsyncClient, chat: list[dict[str, str]], max_tokens: int) -> Record:
    try:
        c = await client.generate(messages=chat, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    except ClientError as e:
        return Record(error=f"{type(e).__name__}: {e}")
    return Record(c.time_to_first_token, c.latency, c.num_output_tokens, inter_token_latencies(c))


def inter_token_latencies(c: Completion) -> list[float]:
    """Per token, as the server's histogram counts them: a response's gap shared among its tokens."""
    gaps = zip(c.chunk_times, c.chunk_times[1:], c.chunk_tokens[1:])
    return [gap for a, b, n in gaps for gap in [(b - a) / n] * n]


class OpenAIClient:
    """The driver for any OpenAI-compatible server (`url`: its base URL, .../v1): streamed chat completions
    with the usage chunk at the end, parsed with aiohttp and json as the other drivers parse theirs, so the
    load generator costs the same on every path (the openai SDK's models cost more per chunk). The token
    count of each chunk is not sent: a request's tokens are spread evenly over its chunks."""

    def __init__(self, url: str, model: str) -> None:
        import os
        self.url, self.model, self._session = url.rstrip("/"), model, None
        self.headers = {"Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'none')}"}

    async def generate(self, messages: list[dict[str, str]], **sampling) -> Completion:
        import aiohttp
        self._session = self._session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600))
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **sampling}
        completion, usage = Completion(), None
        try:
            async with self._session.post(f"{self.url}/chat/completions", json=body, headers=self.headers) as response:
                if response.status != 200:
                    raise ServerError(f"HTTP {response.status}: {(await response.text())[:200]}")
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise ServerError(event["error"].get("message", "error event"))
                    for choice in event.get("choices") or []:
                        completion.add(Chunk(choice["delta"].get("content") or "", False, choice.get("finish_reason")))
                    usage = event.get("usage") or usage
        except aiohttp.ClientError as e:
            raise ServerError(f"{self.url}: {e}") from None
        if usage:
            completion.num_input_tokens, completion.num_output_tokens = (usage["prompt_tokens"],
                                                                         usage["completion_tokens"])
            n = len(completion.chunk_tokens)
            completion.chunk_tokens = [completion.num_output_tokens // n + (i < completion.num_output_tokens % n)
                                       for i in range(n)]
        return completion

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()


def new_client(url: str, model: str, protocol: str = "grpc") -> AsyncClient | OpenAIClient:
    if protocol == "openai":
        return OpenAIClient(url, model)
    # Measure the server as it is: no retries, no circuit breaker.
    return AsyncClient(url, model, protocol, retry=None, breaker=None,
                       timeout=3600)


async def at_concurrency(url: str, model: str, work: Work, concurrency: int,
                         protocol: str = "grpc") -> tuple[list[Record], float]:
    queue = list(reversed(work))
    records: list[Record] = []
    bar = tqdm(total=len(work), desc=f"{model} c={concurrency}", leave=False)
    async with new_client(url, model, protocol) as client:
        async def worker() -> None:
            while queue:
                chat, max_tokens = queue.pop()
                records.append(await send(client, chat, max_tokens))
                bar.update()
        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    bar.close()
    return records, elapsed


async def at_rate(url: str, model: str, work: Work, rate: float, seed: int = 0,
                  protocol: str = "grpc") -> tuple[list[Record], float]:
    """Poisson arrivals: exponential gaps with mean 1/rate, whatever is still in flight."""
    rng = random.Random(seed)
    bar = tqdm(total=len(work), desc=f"{model} rate={rate}/s", leave=False)
    async with new_client(url, model, protocol) as client:
        async def one(chat: list[dict[str, str]], max_tokens: int) -> Record:
            record = await send(client, chat, max_tokens)
            bar.update()
            return record
        start, tasks = time.perf_counter(), []
        for chat, max_tokens in work:
            tasks.append(asyncio.create_task(one(chat, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    return list(records), elapsed


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}


def summarize(model: str, mode: str, level: float, records: list[Record], elapsed: float) -> dict:
    done = [r for r in records if r.error is None]
    row: dict = {"model": model, "mode": mode, "level": level, "requests": len(records),
                 "errors": len(records) - len(done), "seconds": round(elapsed, 2),
                 "requests_per_s": round(len(done) / elapsed, 3),
                 "output_tokens_per_s": round(sum(r.tokens for r in done) / elapsed, 1)}
    for name, values in (("ttft", [r.ttft for r in done if r.ttft is not None]),
                         ("itl", [g for r in done for g in r.itls]), ("e2e", [r.e2e for r in done])):
        for p, v in percentiles(values).items():
            row[f"{name}_{p}_ms"] = None if v is None else round(v * 1000, 1)
    first_error = next((r.error for r in records if r.error), None)
    if first_error:
        print(f"  {model} {mode}={level}: {row['errors']} errors, first: {first_error}", file=sys.stderr)
    return row


def run(url: str, models: list[str], concurrency: list[int], rates: list[float], work: Work,
        protocol: str = "grpc") -> list[dict]:
    rows = []
    for model in models:
        for level in concurrency:
            records, elapsed = asyncio.run(at_concurrency(url, model, work, level, protocol))
            rows.append(summarize(model, "concurrency", level, records, elapsed))
            print(format_row(rows[-1]), flush=True)
        for rate in rates:
            rows.append(summarize(model, "rate", rate, *asyncio.run(at_rate(url, model, work, rate, 0, protocol))))
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    return (f"{row['model']:10s} {row['mode']:11s} {row['level']:>6}: {row['output_tokens_per_s']:7.1f} tok/s, "
            f"{row['requests_per_s']:6.2f} req/s, TTFT p95 {row['ttft_p95_ms']} ms, ITL p95 {row['itl_p95_ms']} ms, "
            f"errors {row['errors']}")


COLUMNS = [("model", "model"), ("mode", "load"), ("level", "level"), ("output_tokens_per_s", "output tok/s"),
           ("requests_per_s", "req/s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95"),
           ("ttft_p99_ms", "TTFT p99"), ("itl_p50_ms", "ITL p50 ms"), ("itl_p95_ms", "ITL p95"),
           ("itl_p99_ms", "ITL p99"), ("e2e_p50_ms", "e2e p50 ms"), ("e2e_p95_ms", "e2e p95"),
           ("e2e_p99_ms", "e2e p99"), ("errors", "errors")]


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    cell = lambda v: "—" if v is None else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(cell(r[k]) for k, _ in COLUMNS) + " |\n" for r in rows)


def write_outputs(rows: list[dict], stem: Path, title: str) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown(rows))
    return [stem.with_suffix(".csv"), stem.with_suffix(".md")] + plot(rows, stem, title)


DISPLAY_NAMES = {"llm": "pagedllm", "ensemble": "pagedllm (ensemble)"}


def plot(rows: list[dict], stem: Path, title: str) -> list[Path]:
    """Throughput and p95 latencies against concurrency, one line per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fixed = [r for r in rows if r["mode"] == "concurrency"]
    if not fixed:
        return []
    panels = [("output_tokens_per_s", "output tokens/s"), ("ttft_p95_ms", "p95 time to first token (ms)"),
              ("itl_p95_ms", "p95 inter-token latency (ms)"), ("e2e_p95_ms", "p95 end-to-end latency (ms)")]
    models = list(dict.fromkeys(r["model"] for r in fixed))
    colours = {m: f"C{i}" for i, m in enumerate(models)}  # one colour per system in every panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        for model in models:
            points = [(r["level"], r[key]) for r in fixed if r["model"] == model and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=DISPLAY_NAMES.get(model, model), color=colours[model])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # pagedllm's latencies sit decades below the baselines'
        ax.set_ylabel(label, fontsize=8)
        ax.set_xlabel("concurrent streams")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = stem.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="localhost:8001", help="the server's gRPC address (openai: its base URL)")
    ap.add_argument("--protocol", choices=("grpc", "http", "openai"), default="grpc")
    ap.add_argument("--models", default="llm")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--rates", default="", help="Poisson arrival rates, requests/s (comma-separated)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", default="32,64,128", help="output lengths drawn uniformly per request")
    ap.add_argument("--out", type=Path, default=OUT / "loadgen", help="output stem: .csv, .md, .png")
    ap.add_argument("--quick", action="store_true", help="4 requests of 4 tokens at concurrency 1,2 and rate 4")
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.rates, args.num_requests, args.max_tokens = "1,2", "4", 4, "4"
    work = mixed_workload(args.num_requests, tuple(int(t) for t in args.max_tokens.split(",")))
    levels = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]
    rows = run(args.url, args.models.split(","), levels, rates, work, args.protocol)
    for path in write_outputs(rows, args.out, f"pagedllm load generator, {args.num_requests} requests per point"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
