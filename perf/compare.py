"""The comparison the field quotes, in one run, one tritonserver, one load generator, the same prompts:
(a) transformers `generate` one request at a time (hf_naive), (b) transformers `generate` on padded
batches formed by Triton's dynamic batcher (hf_batched), (c) pagedllm (llm).

    python -m perf.compare                   # concurrency 4 and 32; 64 requests per point; RESULTS.md
    python -m perf.compare --quick           # a smoke run"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pagedllm.launcher import ServerOptions, TritonServer, free_port
from pagedllm.serving.repository import write_baselines
from perf.loadgen import OUT, markdown, run, write_outputs
from perf.results import write_section
from perf.workloads import mixed_workload

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["hf_naive", "hf_batched", "llm"]


def serve_with_baselines(repository: Path, log: Path) -> TritonServer:
    baselines = OUT / "baselines"
    shutil.rmtree(baselines, ignore_errors=True)
    write_baselines(baselines)
    opts = ServerOptions(repository.resolve(), free_port(), free_port(), free_port(),
                         extra_args=[f"--model-repository={baselines}"])
    return TritonServer(opts, log)


def ratios(rows: list[dict], level: int) -> str:
    at = {r["model"]: r for r in rows if r["mode"] == "concurrency" and r["level"] == level}
    ours = at["llm"]
    lines = []
    for peer in ("hf_naive", "hf_batched"):
        tput = ours["output_tokens_per_s"] / at[peer]["output_tokens_per_s"]
        ttft = at[peer]["ttft_p95_ms"] / ours["ttft_p95_ms"]
        lines.append(f"- vs {peer}: **{tput:.1f}x** output tokens/s, p95 time to first token "
                     f"{ours['ttft_p95_ms']:.0f} ms vs {at[peer]['ttft_p95_ms']:.0f} ms (**{ttft:.1f}x** lower)")
    return f"At {level} concurrent streams, pagedllm:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", default="4,32")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        levels, args.num_requests = [2], 4
    work = mixed_workload(args.num_requests, (4,) if args.quick else (32, 64, 128))
    OUT.mkdir(parents=True, exist_ok=True)
    with serve_with_baselines(args.model_repository, OUT / "compare-tritonserver.log") as server:
        run(server.grpc_url, MODELS, [1], [], work[:2])  # warm-up
        rows = run(server.grpc_url, MODELS, levels, [], work)
    title = f"hf_naive vs hf_batched vs pagedllm, {args.num_requests} chat requests per point"
    paths = write_outputs(rows, OUT / "compare", title)
    body = (f"`python -m perf.compare` — SmolLM2-135M-Instruct, bfloat16, greedy with ignore_eos, "
            f"{args.num_requests} chat requests per point (prompt mix of short, two-part and system-prompt chats; "
            f"32, 64 or 128 output tokens each), one tritonserver serving all three, the same gRPC streaming "
            f"load generator (perf/loadgen.py). The baselines answer once at the end, so their time to first token "
            f"is their end-to-end latency.\n\n{ratios(rows, max(levels))}\n{markdown(rows)}\n"
            f"![compare](compare.png)\n")
    print(body)
    if not args.quick:
        shutil.copy(paths[-1], Path(__file__).with_name("compare.png"))
        write_section("compare", body)


if __name__ == "__main__":
    main()
