"""pagedllm-chat: an interactive streaming chat (or one question with --once) against a pagedllm server."""
from __future__ import annotations

import argparse
import sys

from pagedllm_client.client import Client
from pagedllm_client.errors import ClientError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pagedllm-chat", description=__doc__)
    ap.add_argument("--url", default="localhost:8001", help="gRPC address of the server")
    ap.add_argument("--model", default="ensemble")
    ap.add_argument("--once", metavar="QUESTION", help="ask one question, print the answer, exit")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--system", help="a system prompt")
    args = ap.parse_args(argv)
    client = Client(args.url, args.model)
    history = [{"role": "system", "content": args.system}] if args.system else []
    questions = [args.once] if args.once else _prompts()
    for question in questions:
        history.append({"role": "user", "content": question})
        try:
            answer = ""
            for delta in client.stream(messages=history, max_tokens=args.max_tokens, temperature=args.temperature):
                answer += delta
                print(delta, end="", flush=True)
            print()
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        history.append({"role": "assistant", "content": answer})
    return 0


def _prompts():
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if line:
            yield line


if __name__ == "__main__":
    sys.exit(main())
