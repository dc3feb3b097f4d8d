"""Structured output: 32 requests at once, every one constrained by a JSON schema, against the same requests
unconstrained, in one process (alternating, best of the repeats); the schemas' compile time, and the cost of
a step's token masks.

    python -m perf.bench_structured           # writes perf/RESULTS.md
    python -m perf.bench_structured --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import xgrammar as xgr

from pagedllm import LLM, SamplingParams
from pagedllm.engine.grammar_worker import JSON_LAYOUT
from pagedllm.engine.sampling_params import StructuredOutputsParams
from pagedllm.engine.structured_output import StructuredOutputs
from perf.results import write_section
from perf.workloads import QUESTIONS

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["topic", "answer", "confidence", "tags"],
          "properties": {"topic": {"type": "string", "maxLength": 40}, "answer": {"type": "string"},
                         "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4}}}


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, str]:
    """(seconds, output tokens, "valid JSON / finished answers")."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - start
    finished = [o for o in outs if o.finish_reason == "stop"]
    return secs, sum(len(o.token_ids) for o in outs), f"{sum(_parses(o.text) for o in finished)} / {len(finished)}"


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def mask_cost(structured: StructuredOutputs, rows: int, steps: int) -> float:
    """Milliseconds to fill and apply the masks of `rows` constrained sequences, per step, along real paths
    (each matcher follows tokens its own mask allows)."""
    import torch
    grammar = structured.compile(StructuredOutputsParams(json=SCHEMA))
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
    logits, generator = torch.zeros(rows, structured.vocab_size), torch.Generator().manual_seed(0)
    bitmask, times = xgr.allocate_token_bitmask(rows, structured.vocab_size), []
    for _ in range(steps):
        logits.normal_(generator=generator)
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        times.append(time.perf_counter() - start)
        for i, m in enumerate(matchers):
            if not m.is_terminated():
                m.accept_token(int(logits[i].argmax()))
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny run; does not touch RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.repeats = 4, 8, 1
    llm = LLM(kv_cache_memory=256 << 20)
    engine = llm.engine
    prompts = [engine.apply_chat_template([{"role": "user", "content": f"{q} Answer as JSON."}])
               for q in (QUESTIONS * 2)[:args.requests]]
    plain = SamplingParams(temperature=0.8, seed=1, max_tokens=args.max_tokens)
    constrained = SamplingParams(temperature=0.8, seed=1, max_tokens=args.max_tokens,
                                 structured_outputs=StructuredOutputsParams(json=SCHEMA))
    fresh = StructuredOutputs(engine.tokenizer, engine.model_config.vocab_size, engine.eos_token_ids,
                              engine.config.constraint_compile_timeout)
    fresh.compile(StructuredOutputsParams(json_object=True))  # the grammar worker started: not timed
    start = time.perf_counter()
    fresh.compile(StructuredOutputsParams(json=SCHEMA))
    compile_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    fresh.compile(StructuredOutputsParams(json=SCHEMA))
    cached_ms = (time.perf_counter() - start) * 1000
    best = {"plain": (float("inf"), 0, ""), "json": (float("inf"), 0, "")}
    for _ in range(args.repeats):
        for name, params in (("plain", plain), ("json", constrained)):
            result = run(llm, prompts, params)
            if result[0] / max(1, result[1]) < best[name][0] / max(1, best[name][1]):
                best[name] = result
    masks = mask_cost(fresh, args.requests, 4 if args.quick else 40)
    body = report(args, best, compile_ms, cached_ms, masks)
    print(body)
    if not args.quick:
        write_section("bench_structured", body)


def report(args, best, compile_ms: float, cached_ms: float, masks: float) -> str:
    rate = {name: tokens / secs for name, (secs, tokens, _) in best.items()}
    return "\n".join([
        f"`python -m perf.bench_structured` — SmolLM2-135M-Instruct, bfloat16, {args.requests} chat requests at "
        f"once, temperature 0.8, up to {args.max_tokens} tokens, best of {args.repeats} alternating runs; the "
        f"constrained ones follow a 4-field JSON schema (xgrammar, laid out as {JSON_LAYOUT}).\n",
        "| requests | output tok/s | vs unconstrained | answers that parse as JSON / answers that ended |",
        "|---|---:|---:|---:|",
        f"| unconstrained | {rate['plain']:.0f} | 1.00x | {best['plain'][2]} |",
        f"| every one JSON-schema constrained | {rate['json']:.0f} | **{rate['json'] / rate['plain']:.2f}x** | "
        f"{best['json'][2]} |",
        "",
        f"Schema compile: {compile_ms:.1f} ms the first time, {cached_ms:.3f} ms from the cache. Token masks "
        f"for {args.requests} constrained rows: {masks:.2f} ms a step (median, filled one row after another "
        "and applied to the logits)."])


if __name__ == "__main__":
    main()
