"""perf_analyzer sweeps: the real `perf_analyzer` (gRPC streaming) against the ensemble and the llm model,
realistic chat prompts from an input-data JSON, one run per concurrency level, merged into one CSV.

    python -m perf.sweep --url localhost:8001                       # concurrency 1..64, writes perf/out/sweep.csv
    python -m perf.sweep --url localhost:8001 --concurrency 1,2 --max-tokens 8 --requests 4 --out x.csv

For a decoupled model perf_analyzer's latency columns time the first response (time to first token) and
"Response Throughput" counts streamed responses per second."""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from perf.workloads import chat_prompts

OUT = Path(__file__).resolve().parent / "out"


def perf_analyzer() -> tuple[str, dict[str, str]]:
    """The binary tritonclient[all]==2.51.0 installs beside this interpreter, and an environment where it
    finds libcudart (from the nvidia-cuda-runtime-cu12 wheel); it also needs Debian's libb64-0d."""
    binary = Path(sys.executable).with_name("perf_analyzer")
    found = str(binary) if binary.exists() else shutil.which("perf_analyzer")
    if found is None:
        raise FileNotFoundError("perf_analyzer not found: run `make setup` (tritonclient[all]==2.51.0)")
    env = dict(os.environ)
    spec = importlib.util.find_spec("nvidia.cuda_runtime")
    if spec is not None and spec.submodule_search_locations:
        lib = str(Path(list(spec.submodule_search_locations)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    return found, env


def input_data(path: Path, count: int, max_tokens: int) -> Path:
    sampling = json.dumps({"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    rows = [{"messages": [json.dumps(chat)], "sampling_parameters": [sampling], "stream": [True]}
            for chat in chat_prompts(count)]
    path.write_text(json.dumps({"data": rows}, indent=1))
    return path


def run_one(url: str, model: str, concurrency: int, data: Path, requests: int, csv_path: Path) -> dict[str, str]:
    binary, env = perf_analyzer()
    cmd = [binary, "-m", model, "-i", "grpc", "--streaming", "-u", url, "--input-data", str(data),
           "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
           "--measurement-request-count", str(requests), "--stability-percentage", "999", "-f", str(csv_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed for {model} at concurrency {concurrency}:\n{done.stdout[-3000:]}"
                           f"{done.stderr[-3000:]}")
    with open(csv_path) as f:
        return next(csv.DictReader(f))


def sweep(url: str, models: list[str], levels: list[int], max_tokens: int, requests: int, out: Path) -> list[dict]:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = input_data(out.with_suffix(".input.json"), 64, max_tokens)
    rows = []
    for model in models:
        for level in levels:
            row = run_one(url, model, level, data, max(requests, level), out.with_suffix(".tmp.csv"))
            rows.append({"model": model, "max_tokens": max_tokens, **row})
            print(f"{model:10s} concurrency {level:3d}: {float(row['Response Throughput']):8.1f} responses/s, "
                  f"p95 first response {int(row['p95 latency']) / 1000:8.1f} ms", flush=True)
    out.with_suffix(".tmp.csv").unlink(missing_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="localhost:8001", help="the server's gRPC address")
    ap.add_argument("--models", default="ensemble,llm")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16,
                    help="requests per measurement window (at least the concurrency)")
    ap.add_argument("--out", type=Path, default=OUT / "sweep.csv")
    args = ap.parse_args(argv)
    sweep(args.url, args.models.split(","), [int(c) for c in args.concurrency.split(",")], args.max_tokens,
          args.requests, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
