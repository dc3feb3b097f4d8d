"""The gateway's Prometheus metrics, as its clients see the service: requests, tokens, latencies,
rejections, routing, and each replica's health and load. Served on the gateway's own GET /metrics.

Beside them, the engines' own queues and cache under vLLM's names and meaning (summed over the replicas that
report them, per model): the Model Server Protocol that the Gateway API Inference Extension's endpoint picker
schedules by, so a pod running `pagedllm serve --openai-port` can sit in an InferencePool
(deploy/k8s/inference-extension/)."""
from __future__ import annotations

import time
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedllm.gateway.replicas import ReplicaPool

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class GatewayMetrics:
    def __init__(self, pool: ReplicaPool) -> None:
        self.registry = CollectorRegistry()
        self.pool = pool
        r = self.registry
        self.requests = Counter("pagedllm_gateway_requests", "Requests answered, by key, model and HTTP status",
                                ["key", "model", "status"], registry=r)
        self.adapter_requests = Counter("pagedllm_gateway_adapter_requests", "Requests answered with a LoRA "
                                        "adapter, by adapter and HTTP status", ["adapter", "status"], registry=r)
        self.tokens = Counter("pagedllm_gateway_tokens", "Tokens used, by key and kind (prompt or completion)",
                              ["key", "kind"], registry=r)
        self.rejections = Counter("pagedllm_gateway_rejections", "Requests refused, by reason",
                                  ["reason"], registry=r)
        self.routes = Counter("pagedllm_gateway_routes", "Engine requests routed, by model and reason (cache_hit, "
                              "cache_miss, load, no_index, least_outstanding: gateway/routing.py)",
                              ["model", "reason"], registry=r)
        self.routed_cached_tokens = Counter("pagedllm_gateway_routed_cached_tokens", "Prompt tokens the chosen "
                                            "replica held in its prefix cache when the request was routed there",
                                            ["model"], registry=r)
        self.retries = Counter("pagedllm_gateway_retries", "Requests retried on another replica before their "
                               "first token", registry=r)
        self.ttft = Histogram("pagedllm_gateway_time_to_first_token_seconds", "Arrival at the gateway to the "
                              "first token sent", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pagedllm_gateway_e2e_request_latency_seconds", "Arrival at the gateway to the "
                             "end of the response", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("pagedllm_gateway_in_flight_requests", "Engine requests outstanding, by replica",
                               ["replica"], registry=r)
        self.healthy = Gauge("pagedllm_gateway_replica_healthy", "1 when the replica passed its last health "
                             "check", ["replica"], registry=r)
        self.engine = EngineGauges(r)

    def render(self) -> bytes:
        for replica in self.pool.replicas:  # read at scrape time: always current, nothing to keep in step
            self.in_flight.labels(replica.url).set(replica.outstanding)
            self.healthy.labels(replica.url).set(1 if replica.healthy else 0)
        self.engine.update(self.pool)
        return generate_latest(self.registry)


class EngineGauges:
    """vLLM's metrics, and the KV cache's capacity, from the loads the replicas report with their prefix caches
    (routing.py polls them)."""

    def __init__(self, r: CollectorRegistry) -> None:
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests running in the engines", label, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the engines", label, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 1 is full (mean over replicas)", label,
                              registry=r)
        self.gpu_kv_usage = Gauge("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc's older name", label,
                                  registry=r)
        # cache_dtype is what the cache stores ("int8", "bfloat16", ...; "auto" from a replica that does not say)
        self.cache_config = Gauge("vllm:cache_config_info", "The KV cache's configuration", [
            "model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"], registry=r)
        self.capacity = Gauge("pagedllm_gateway_kv_cache_capacity_tokens", "Tokens the replicas' KV caches hold "
                              "when full, by model and what they store them as", ["model", "kv_cache_dtype"],
                              registry=r)
        self.lora = Gauge("vllm:lora_requests_info", "LoRA adapters in use; the value is when it was read", [
            "model_name", "max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)

    def update(self, pool: ReplicaPool) -> None:
        self.cache_config.clear()
        self.capacity.clear()
        self.lora.clear()
        for model in pool.names:
            indexes = [r.prefix_index(model) for r in pool.replicas if r.serves(model)]
            loads = [i.held.load for i in indexes if i.reporting]
            if not loads:
                continue
            self.running.labels(model).set(sum(load.num_running for load in loads))
            self.waiting.labels(model).set(sum(load.num_waiting for load in loads))
            usage = sum(load.kv_cache_usage for load in loads) / len(loads)
            self.kv_usage.labels(model).set(usage)
            self.gpu_kv_usage.labels(model).set(usage)
            # a cache_config_info per kind of cache the replicas hold: one, unless their engine.json differ
            configs: defaultdict[tuple[int, str], int] = defaultdict(int)  # (block_size, kv_cache_dtype): blocks
            tokens: defaultdict[str, int] = defaultdict(int)
            for held in (i.held for i in indexes if i.reporting):
                configs[held.block_size, held.load.kv_cache_dtype] += held.load.num_blocks
                tokens[held.load.kv_cache_dtype] += held.load.num_blocks * held.block_size
            for (block_size, dtype), num_blocks in configs.items():
                self.cache_config.labels(model, str(block_size), str(num_blocks), "True", dtype).set(1)
            for dtype, capacity in tokens.items():
                self.capacity.labels(model, dtype).set(capacity)
            if any(load.max_loras for load in loads):
                running = sorted({a for load in loads for a in load.running_adapters})
                waiting = sorted({a for load in loads for a in load.waiting_adapters})
                self.lora.labels(model, str(max(load.max_loras for load in loads)), ",".join(running),
                                 ",".join(waiting)).set(time.time())
