"""`pagedllm serve | gateway | demo | generate`."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

from pagedllm.gateway.config import POLICIES, GatewayConfig, RoutingConfig
from pagedllm.launcher import ADMIN_KEY_ENV, CONTROL_MODES, ServerOptions

DEFAULT_REPOSITORY = Path("model_repository")
SERVER_DEFAULTS = ServerOptions(DEFAULT_REPOSITORY)
ENGINE_MODULES = ("torch", "transformers", "xgrammar")  # what the engine extra brings
DEMO_QUESTION = "What is the capital of France? Answer in one sentence, then give one fun fact about it."


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="pagedllm")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help_ in (("serve", "start tritonserver on the model repository"),
                        ("demo", "start the server, stream one chat answer, stop")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
        p.add_argument("--http-port", type=int, default=SERVER_DEFAULTS.http_port)
        p.add_argument("--grpc-port", type=int, default=SERVER_DEFAULTS.grpc_port)
        p.add_argument("--metrics-port", type=int, default=SERVER_DEFAULTS.metrics_port)
        p.add_argument("--host", default=SERVER_DEFAULTS.host,
                       help="the address HTTP, gRPC and metrics listen on (0.0.0.0: every interface)")
        p.add_argument("--model-control-mode", choices=CONTROL_MODES, default=None,
                       help=f"default: explicit when ${ADMIN_KEY_ENV} is set (loads need it), else none")
    serve_ = sub.choices["serve"]
    serve_.add_argument("--openai-port", type=int, default=None, help="also start the OpenAI gateway on this port")
    serve_.add_argument("--openai-host", default=GatewayConfig.host)
    serve_.add_argument("--api-keys", type=Path, default=None, help="the gateway's keys file (JSON)")
    gw = sub.add_parser("gateway", help="the OpenAI-compatible gateway in front of tritonservers")
    gw.add_argument("--triton", action="append", default=[], metavar="HOST:GRPC_PORT",
                    help="a tritonserver's gRPC address (repeat for replicas)")
    gw.add_argument("--triton-dns", action="append", default=[], metavar="NAME:GRPC_PORT",
                    help="a DNS name whose every address is a replica, resolved at each health check "
                         "(a Kubernetes headless Service)")
    gw.add_argument("--host", default=GatewayConfig.host)
    gw.add_argument("--port", type=int, default=GatewayConfig.port)
    gw.add_argument("--api-keys", type=Path, default=None, help="JSON keys file; none: an open gateway")
    gw.add_argument("--served-model-name", action="append", default=[], metavar="NAME=MODEL",
                    help="serve MODEL under NAME too")
    gw.add_argument("--model", action="append", default=[], metavar="MODEL",
                    help="a Triton model to serve, where a replica has it ready (repeat; default: llm)")
    gw.add_argument("--lora-adapter", action="append", default=[], metavar="NAME=MODEL",
                    help="a LoRA adapter MODEL serves (its multi_lora.json), requested as model NAME (repeat)")
    gw.add_argument("--max-body-bytes", type=int, default=GatewayConfig.max_body_bytes)
    gw.add_argument("--max-model-len", action="append", default=[], metavar="MODEL=TOKENS",
                    help="MODEL's max_model_len: quotas reserve the rest of it for requests without max_tokens "
                         f"(default {GatewayConfig.default_max_model_len}; listed in /v1/models)")
    gw.add_argument("--routing", choices=POLICIES, default=RoutingConfig.policy,
                    help="cache-aware: the replica holding most of the prompt's head in its prefix cache, weighed "
                         "against load (needs --tokenizer for the model); least-outstanding: the least loaded")
    gw.add_argument("--tokenizer", action="append", default=[], metavar="MODEL=PATH",
                    help="MODEL's tokenizer (its Hugging Face folder), for cache-aware routing; pagedllm serve "
                         "passes each model's")
    gen = sub.add_parser("generate", help="offline generation with the engine, no server")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="a local Hugging Face directory (default: embedded SmolLM2)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.command != "gateway":
        require_engine(args.command)
    return {"serve": serve, "gateway": gateway, "demo": demo, "generate": generate}[args.command](args)


def require_engine(command: str) -> None:
    """Every command but `gateway` runs the engine, which a gateway install (`pagedllm[gateway]`) lacks."""
    missing = [name for name in ENGINE_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"pagedllm {command} runs the engine, which needs {', '.join(missing)}: "
                         f"pip install 'pagedllm[serve]' (this install has the gateway only)")


def _server(args: argparse.Namespace, log_path: Path | None = None):
    from pagedllm.launcher import TritonServer
    from pagedllm.weights import ensure_default_model

    if not (args.model_repository / "llm").exists():
        raise SystemExit(f"--model-repository: {args.model_repository} has no llm/ model (run from the checkout)")
    opts = ServerOptions(args.model_repository.resolve(), args.http_port, args.grpc_port, args.metrics_port,
                         args.model_control_mode, host=args.host)
    try:
        mode = opts.control_mode()
    except ValueError as e:
        raise SystemExit(str(e).replace("model_control_mode", "--model-control-mode", 1)) from None
    if mode != "explicit":
        how = "every model loads at start" if mode == "none" else "models follow their folders"
        print(f"model control: {mode} ({how}; the repository API cannot load or unload; set {ADMIN_KEY_ENV} for "
              f"explicit control behind that key)", flush=True)
    ensure_default_model()  # once, here, rather than concurrently inside two Triton models
    return TritonServer(opts, log_path)


def serve(args: argparse.Namespace) -> int:
    """tritonserver, and the gateway beside it with --openai-port, under pagedllm.supervisor."""
    from pagedllm.engine.config import declared_adapters, declared_max_model_len, declared_model_path
    from pagedllm.gateway.replicas import llm_models_in
    from pagedllm.supervisor import Supervisor

    if args.api_keys and args.openai_port is None:
        raise SystemExit("--api-keys: the keys are the gateway's; give --openai-port too")
    server = _server(args)
    gateway_command = None
    if args.openai_port is not None:
        gateway_command = [sys.executable, "-m", "pagedllm.cli", "gateway", "--triton", server.grpc_url,
                           "--host", args.openai_host, "--port", str(args.openai_port)]
        gateway_command += ["--api-keys", str(args.api_keys)] if args.api_keys else []
        for model in llm_models_in(args.model_repository):
            gateway_command += ["--model", model]
            length = declared_max_model_len(args.model_repository / model)
            gateway_command += ["--max-model-len", f"{model}={length}"] if length else []
            path = declared_model_path(args.model_repository / model)
            gateway_command += ["--tokenizer", f"{model}={path}"] if path else []
            for adapter in declared_adapters(args.model_repository / model):
                gateway_command += ["--lora-adapter", f"{adapter}={model}"]

    def ready() -> None:
        print(f"pagedllm ready\n  HTTP    http://{server.http_url}/v2/models/ensemble/generate_stream\n"
              f"  gRPC    {server.grpc_url}  (streaming: ensemble or llm; unary: generate)\n"
              f"  metrics {server.metrics_url}", flush=True)
        if args.openai_port is not None:
            print(f"  OpenAI  http://{args.openai_host}:{args.openai_port}/v1", flush=True)

    return Supervisor(server, gateway_command).run(ready)


def gateway(args: argparse.Namespace) -> int:
    from pagedllm.gateway.config import parse_lengths, parse_pairs
    from pagedllm.gateway.server import run

    try:
        models = {"models": args.model} if args.model else {}
        return run(GatewayConfig(args.triton, args.host, args.port, args.api_keys,
                                 parse_pairs("--served-model-name", args.served_model_name, "NAME=MODEL"),
                                 args.max_body_bytes, triton_dns=args.triton_dns,
                                 max_model_len=parse_lengths(args.max_model_len),
                                 lora_adapters=parse_pairs("--lora-adapter", args.lora_adapter, "NAME=MODEL"),
                                 routing=RoutingConfig(args.routing,
                                                       parse_pairs("--tokenizer", args.tokenizer, "MODEL=PATH")),
                                 **models))
    except ValueError as e:  # a bad flag or keys file: the message names it
        raise SystemExit(str(e)) from None


def demo(args: argparse.Namespace) -> int:
    from pagedllm_client import Client

    log = Path("demo-tritonserver.log")
    print(f"starting tritonserver (log: {log}) ...", flush=True)
    with _server(args, log) as server:
        print(f"ready. Streaming the answer to: {DEMO_QUESTION}\n", flush=True)
        with Client(server.grpc_url, "ensemble") as client:
            for delta in client.stream(messages=[{"role": "user", "content": DEMO_QUESTION}],
                                       max_tokens=96, temperature=0.0):
                print(delta, end="", flush=True)
        print("\n\nstopping tritonserver.", flush=True)
    return 0


def generate(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    llm = LLM(args.model)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    run = llm.chat if args.chat else llm.generate
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    print(run(prompt, params, use_tqdm=False)[0].text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
