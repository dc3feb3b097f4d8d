"""What LoRA adapters cost: output tokens/s of a batch of streams spread over several adapters against the same batch
on the base model, in one process (rounds alternate; medians of the per-round ratios), and the time to load an
adapter (read, checked, copied into a slot). The adapters are PEFT's, built here with seeded random weights of the
given rank on every projection PEFT targets in a Llama model; every request runs to max_tokens (ignore_eos).

    python -m perf.bench_lora           # writes perf/RESULTS.md
    python -m perf.bench_lora --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pagedllm import LLM, LoRARequest, SamplingParams
from pagedllm.weights import ensure_default_model
from perf import llamacpp
from perf.results import write_section
from perf.workloads import QUESTIONS

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(model_dir: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters of `rank` with small seeded random weights (so the answers stay text)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                                init_lora_weights=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        model.save_pretrained(root / f"adapter{i}")
        paths.append(root / f"adapter{i}")
    return paths


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, loras: list[LoRARequest | None]) -> float:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny run; does not touch RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.streams, args.adapters, args.rank, args.max_tokens, args.rounds = 4, 2, 4, 4, 1
    model_dir = ensure_default_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_adapters(model_dir, Path(tmp), args.adapters, args.rank)
        llm = LLM(kv_cache_memory=256 << 20, enable_lora=True, max_loras=args.adapters, max_lora_rank=args.rank)
        loads = []
        for i, path in enumerate(paths):
            start = time.perf_counter()
            llm.engine.load_lora(LoRARequest(f"adapter{i}", str(path)))
            assert llm.engine.lora.acquire(f"adapter{i}")  # into its slot, as a request's first step would
            llm.engine.lora.release(f"adapter{i}")
            loads.append(time.perf_counter() - start)
        chats = [llm.engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS * 8]
        prompts = chats[:args.streams]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        runs = {"base model": [None] * args.streams, "1 adapter": [LoRARequest("adapter0")] * args.streams,
                f"{args.adapters} adapters": [LoRARequest(f"adapter{i % args.adapters}") for i in range(args.streams)]}
        peer = {} if args.quick else {"base model": None,
                                      "1 adapter": llamacpp.lora_gguf(paths[0], Path(tmp) / "adapter0.gguf")}
        run(llm, prompts, params, runs["1 adapter"])  # warm
        rates: dict[str, list[float]] = {name: [] for name in runs}
        peer_rates: dict[str, list[float]] = {name: [] for name in peer}
        for _ in range(args.rounds):
            for name, loras in runs.items():
                rates[name].append(run(llm, prompts, params, loras))
            for name, lora in peer.items():
                peer_rates[name].append(llamacpp.batched_generation(
                    llamacpp.gguf("bf16"), [args.streams], generate=args.max_tokens, lora=lora)[args.streams])
    body = report(args, rates, peer_rates, loads)
    print(body)
    if not args.quick:
        write_section("bench_lora", body)


def report(args, rates: dict[str, list[float]], peer: dict[str, list[float]], loads: list[float]) -> str:
    def ratio(table: dict[str, list[float]], name: str) -> str:
        return f"{statistics.median(r / b for r, b in zip(table[name], table['base model'])):.2f}x"
    lines = [f"`python -m perf.bench_lora` — SmolLM2-135M-Instruct, bfloat16, {args.streams} chat streams of "
             f"{args.max_tokens} tokens (ignore_eos): on the base model, all on one adapter, and spread over "
             f"{args.adapters} adapters, each of rank {args.rank} on q/k/v/o and the MLP (PEFT's files, seeded); "
             f"{args.rounds} rounds alternating, medians. The goal (issue 33) is at least 0.8x the base model's "
             "throughput with 4 adapters, and a load under 1 s. llama.cpp (llama-batched-bench, the same adapter "
             "converted by its convert_lora_to_gguf.py, --lora) runs every sequence on one adapter, its only mode "
             "there; its figure is generation alone (S_TG), ours output tokens over the whole run, prompts "
             "included.\n", "| run | pagedllm tok/s | vs its base | llama.cpp tok/s | vs its base |",
             "|---|---:|---:|---:|---:|"]
    for name, values in rates.items():
        theirs = (f"{statistics.median(peer[name]):.0f} | {ratio(peer, name)}" if name in peer else "- | -")
        lines.append(f"| {name} | {statistics.median(values):.0f} | {ratio(rates, name)} | {theirs} |")
    lines.append(f"\nLoading an adapter (read, checked, into a slot): {statistics.median(loads) * 1000:.0f} ms median, "
                 f"{max(loads) * 1000:.0f} ms at most.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
