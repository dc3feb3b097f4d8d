"""pagedllm-chat: an interactive streaming chat that keeps the conversation, or one question with --once."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from pagedllm_client.client import Client
from pagedllm_client.errors import ClientError
from pagedllm_client.resilience import DEFAULT_URL


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pagedllm-chat", description=__doc__)
    ap.add_argument("--url", default=DEFAULT_URL, help="server address (gRPC port, or HTTP with --protocol http)")
    ap.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    ap.add_argument("--model", default="ensemble")
    ap.add_argument("--once", metavar="QUESTION", help="ask one question, print the answer, exit")
    ap.add_argument("--system", help="a system prompt")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each response")
    return ap.parse_args(argv)


def sampling(args: argparse.Namespace) -> dict:
    chosen = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
              "top_k": args.top_k, "seed": args.seed}
    return {k: v for k, v in chosen.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = Client(args.url, args.model, protocol=args.protocol, timeout=args.timeout)
    history = [{"role": "system", "content": args.system}] if args.system else []
    for question in [args.once] if args.once else _prompts():
        history.append({"role": "user", "content": question})
        answer = ""
        try:
            for delta in client.stream(messages=history, **sampling(args)):
                answer += delta
                print(delta, end="", flush=True)
            print()
        except ClientError as e:
            print(f"\nerror ({type(e).__name__}): {e}", file=sys.stderr)
            if args.once:
                return 1
            history.pop()  # the question goes unanswered; the chat goes on
            continue
        except KeyboardInterrupt:  # stop this answer (the server aborts it), keep the chat
            print()
        history.append({"role": "assistant", "content": answer})
    return 0


def _prompts() -> Iterator[str]:
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line:
            yield line


if __name__ == "__main__":
    sys.exit(main())
