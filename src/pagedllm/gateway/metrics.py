"""The gateway's Prometheus metrics, as its clients see the service: requests, tokens, latencies,
rejections, and each replica's health and load. Served on the gateway's own GET /metrics."""
from __future__ import annotations

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

    def render(self) -> bytes:
        for replica in self.pool.replicas:  # read at scrape time: always current, nothing to keep in step
            self.in_flight.labels(replica.url).set(replica.outstanding)
            self.healthy.labels(replica.url).set(1 if replica.healthy else 0)
        return generate_latest(self.registry)
