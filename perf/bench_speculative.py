"""Speculative decoding (n-gram prompt lookup) on against off, in one process, the same requests (greedy,
so the outputs are identical token for token): batch 1 on input-grounded tasks, batch 1 on free-form chat,
and 32 chat requests at once. Each setting alternates on and off and keeps the best of the repeats.

    python -m perf.bench_speculative           # writes perf/RESULTS.md
    python -m perf.bench_speculative --quick   # a smoke run
"""
from __future__ import annotations

import argparse
import time

from pagedllm import LLM, SamplingParams
from perf.results import write_section
from perf.workloads import GROUNDED_TASKS, QUESTIONS, chat_prompts

SPEC = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 4,
        "disable_by_batch_size": 8}


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, list[list[int]]]:
    """(seconds, output tokens, outputs)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outs), [o.token_ids for o in outs]


def compare(on: LLM, off: LLM, prompts: list[list[int]], max_tokens: int, repeats: int) -> dict:
    best = {"on": float("inf"), "off": float("inf")}
    outputs, tokens = {}, {}
    spec = on.engine.speculator
    drafted, accepted = spec.num_draft_tokens, spec.num_accepted_tokens
    for _ in range(repeats):
        for name, llm in (("off", off), ("on", on)):
            secs, tokens[name], outputs[name] = run(llm, prompts, max_tokens)
            best[name] = min(best[name], secs)
    accepted = (spec.num_accepted_tokens - accepted) / repeats
    row = {"off": tokens["off"] / best["off"], "on": tokens["on"] / best["on"], "tokens": tokens["on"],
           "acceptance": accepted / max(1, (spec.num_draft_tokens - drafted) / repeats),
           "same": outputs["on"] == outputs["off"]}
    if len(prompts) == 1:  # one sequence: a step emits its kept drafts and one token
        step_cost = (best["on"] / (tokens["on"] - accepted)) / (best["off"] / tokens["off"])
        steps = lookup_bound_steps(prompts[0], outputs["on"][0], SPEC["num_speculative_tokens"])
        row["bound"] = tokens["on"] / (steps * step_cost)
    return row


def lookup_bound_steps(prompt: list[int], output: list[int], num_drafts: int) -> int:
    """Steps to emit `output` if each step drafted the longest run of the coming tokens (up to `num_drafts`)
    found anywhere in the prompt and the output so far: what the best possible prompt lookup would need."""
    steps, pos = 0, 0
    while pos < len(output):
        context, coming = prompt + output[:pos], output[pos:pos + num_drafts]
        run = max((_common_prefix(context[i:i + len(coming)], coming) for i in range(len(context))), default=0)
        pos, steps = pos + run + 1, steps + 1
    return steps


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny run; does not touch RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 8, 1
    kv = {"kv_cache_memory": 256 << 20}  # room for the batch of 32 and its prompts
    off, on = LLM(**kv), LLM(speculative_config=SPEC, **kv)
    chat = lambda text: on.engine.apply_chat_template([{"role": "user", "content": text}])  # noqa: E731
    rows = {}
    tasks = list(GROUNDED_TASKS.items())[:1 if args.quick else None]
    for name, text in tasks:
        rows[f"batch 1: {name}"] = compare(on, off, [chat(text)], args.max_tokens, args.repeats)
    questions = QUESTIONS[:1 if args.quick else 4]
    rows[f"batch 1: free-form chat ({len(questions)} questions in turn)"] = _sequential(
        on, off, [chat(q) for q in questions], args)
    batch = [on.engine.apply_chat_template(c) for c in chat_prompts(4 if args.quick else 32)]
    rows[f"{len(batch)} chat requests at once"] = compare(on, off, batch, args.max_tokens // 2, args.repeats)
    body = report(rows, args)
    print(body)
    if not args.quick:
        write_section("bench_speculative", body)


def _sequential(on: LLM, off: LLM, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    parts = [compare(on, off, [p], args.max_tokens, args.repeats) for p in prompts]
    tokens = sum(p["tokens"] for p in parts)
    secs = {k: sum(p["tokens"] / p[k] for p in parts) for k in ("on", "off")}
    bound_secs = sum(p["tokens"] / (p["bound"] * p["off"]) for p in parts)
    return {"off": tokens / secs["off"], "on": tokens / secs["on"], "tokens": tokens,
            "bound": secs["off"] / bound_secs,
            "acceptance": sum(p["acceptance"] for p in parts) / len(parts), "same": all(p["same"] for p in parts)}


def report(rows: dict, args: argparse.Namespace) -> str:
    lines = [f"`python -m perf.bench_speculative` — SmolLM2-135M-Instruct, bfloat16, greedy, up to "
             f"{args.max_tokens} tokens ({args.max_tokens // 2} for the batch of 32), n-gram drafts {SPEC}; best of "
             f"{args.repeats} alternating runs each. In float32 the outputs are identical with and without "
             "speculation (the tests check it); in bfloat16 a verification step of several rows rounds differently "
             "from a one-token step, as another batch would, so after a near-tie an output can part from the "
             "other (`same output`), and its figures then compare different texts.\n",
             "`best lookup` is the ceiling of any prompt lookup on the same output: each step drafting exactly the "
             "longest run of the coming tokens found anywhere in the prompt or the output so far (one token "
             "counts), at the measured cost of a verification step against a one-token step.\n",
             "| workload | spec off (tok/s) | spec on (tok/s) | on / off | best lookup | drafts kept | same output |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        bound = f"{r['bound']:.2f}x" if "bound" in r else "n/a"
        lines.append(f"| {name} | {r['off']:.0f} | {r['on']:.0f} | **{r['on'] / r['off']:.2f}x** | {bound} | "
                     f"{r['acceptance'] * 100:.0f}% | {'yes' if r['same'] else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
