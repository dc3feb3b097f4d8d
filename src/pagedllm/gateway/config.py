"""The gateway's settings, with their defaults in one place."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Route(NamedTuple):
    """Where a request's `model` goes: the Triton model, and the LoRA adapter it runs with there (or None)."""
    model: str
    lora_name: str | None = None


@dataclass
class RoutingConfig:
    """How a request's replica is chosen (routing.py). "cache-aware": the replica whose engine holds most of the
    prompt's head in its prefix cache, against its load; "least-outstanding": the fewest requests in flight."""
    policy: str = "cache-aware"
    tokenizers: dict[str, str] = field(default_factory=dict)  # Triton model -> its tokenizer (folder or hub id)
    poll_interval: float = 0.5  # how often each replica is asked which blocks changed (and its load)
    min_prefix_tokens: int = 64  # less of the prompt cached anywhere: routed by load alone
    # a cached token saves its prefill; a request already in flight on the replica costs this many of them (one thread
    # of this project's CPUs: a 1,500-token prefill takes 4-5 s, a 16-token answer about 0.6 s, perf/bench_routing.py)
    load_cost_tokens: int = 256
    # a replica is never given a request while it has more than ratio x the least loaded one's, plus slack (on one
    # thread a prefix miss stalls a replica for seconds: a slack of 2 sent a tenant's prompt elsewhere cold in 6 of
    # 240 requests, and the stalls behind those set the p90, perf/bench_routing.py)
    imbalance_ratio: float = 2.0
    imbalance_slack: int = 4
    kv_full: float = 0.95  # nor while its engine reports its KV cache this full and another has room
    pending_seconds: float = 60.0  # a prompt just sent counts as cached there this long (until its engine says)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"--routing: {self.policy!r} is not one of {', '.join(POLICIES)}")


POLICIES = ("cache-aware", "least-outstanding")


@dataclass
class GatewayConfig:
    triton: list[str]  # HOST:GRPC_PORT of each tritonserver replica
    host: str = "127.0.0.1"
    port: int = 9000
    api_keys: Path | None = None  # None: an open gateway (a warning at start)
    served_model_names: dict[str, str] = field(default_factory=dict)  # alias -> Triton model name
    max_body_bytes: int = 4 << 20  # the llm model takes prompts of up to 1 MiB; JSON escaping can double that
    health_interval: float = 2.0
    upstream_timeout: float = 600.0  # the longest wait for one response of a stream (queueing included)
    graceful_shutdown: float = 30.0  # SIGTERM: streams in flight get this long to finish
    max_connections: int = 1024  # open connections at once; beyond, 503 before the request is read
    header_timeout: float = 10.0  # a request's headers must arrive within this long (slowloris)
    triton_dns: list[str] = field(default_factory=list)  # HOST:GRPC_PORT names whose every address is a replica
    # the Triton models served, where a replica has them ready (and the aliases' targets); checked by name, as
    # a server whose admin groups need a key does not list its repository
    models: list[str] = field(default_factory=lambda: ["llm"])
    responses_stored: int = 1024  # /v1/responses kept for previous_response_id, per gateway, oldest dropped first
    responses_kept_seconds: float = 3600.0  # and for at most this long
    # Triton model -> its max_model_len (`pagedllm serve` passes its repository's). A request without
    # max_tokens may generate up to the rest of the context, so its quota reserves that much.
    max_model_len: dict[str, int] = field(default_factory=dict)
    default_max_model_len: int = 8192  # assumed for a model missing from max_model_len
    # LoRA adapter -> the Triton model that serves it (its base; `pagedllm serve` passes its repository's
    # multi_lora.json names): requests name the adapter as `model`, as with vLLM
    lora_adapters: dict[str, str] = field(default_factory=dict)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def context_length(self, model: str) -> int:
        return self.max_model_len.get(model, self.default_max_model_len)

    def route_names(self) -> set[str]:
        """Every name a request's `model` may give."""
        return {*self.models, *self.served_model_names, *self.lora_adapters}

    def route(self, name: str) -> Route:
        """The Triton model (and adapter) a request's `model` names: an adapter, a served name or the model."""
        if name in self.lora_adapters:
            return Route(self.lora_adapters[name], name)
        return Route(self.served_model_names.get(name, name))

    def __post_init__(self) -> None:
        if not self.triton and not self.triton_dns:
            raise ValueError("--triton: give at least one HOST:GRPC_PORT (or --triton-dns NAME:GRPC_PORT)")
        for flag, urls in (("--triton", self.triton), ("--triton-dns", self.triton_dns)):
            for url in urls:
                host, _, port = url.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"{flag}: {url!r} is not HOST:GRPC_PORT")
        clash = set(self.lora_adapters) & {*self.served_model_names, *self.models}
        if clash:
            raise ValueError(f"--lora-adapter: {sorted(clash)[0]!r} is a model's name already; give the adapter "
                             "another")
        self.models = list(dict.fromkeys([*self.models, *self.served_model_names.values(),
                                          *self.lora_adapters.values()]))


def parse_pairs(flag: str, values: list[str], shape: str) -> dict[str, str]:
    """Repeated `--flag KEY=VALUE` entries (`--served-model-name NAME=MODEL`, `--max-model-len MODEL=TOKENS`)."""
    pairs = {}
    for value in values:
        name, sep, model = value.partition("=")
        if not sep or not name or not model:
            raise ValueError(f"{flag}: {value!r} is not {shape}")
        pairs[name] = model
    return pairs


def parse_lengths(values: list[str]) -> dict[str, int]:
    """`--max-model-len MODEL=TOKENS` entries."""
    lengths = parse_pairs("--max-model-len", values, "MODEL=TOKENS")
    if not all(v.isdigit() and int(v) > 0 for v in lengths.values()):
        raise ValueError(f"--max-model-len: {values} must be MODEL=TOKENS with TOKENS a positive integer")
    return {model: int(tokens) for model, tokens in lengths.items()}
