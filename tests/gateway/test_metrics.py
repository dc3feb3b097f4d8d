"""The gateway's metrics read each replica's health and load at scrape time."""
from __future__ import annotations

from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.replicas import ReplicaPool


def test_replica_gauges_are_current_at_every_scrape():
    pool = ReplicaPool(["a:1", "b:1"], ["llm"])
    metrics = GatewayMetrics(pool)
    pool.replicas[0].healthy, pool.replicas[0].outstanding = True, 3
    text = metrics.render().decode()
    assert 'pagedllm_gateway_in_flight_requests{replica="a:1"} 3.0' in text
    assert 'pagedllm_gateway_replica_healthy{replica="a:1"} 1.0' in text
    assert 'pagedllm_gateway_replica_healthy{replica="b:1"} 0.0' in text
    pool.replicas[0].healthy, pool.replicas[0].outstanding = False, 0
    text = metrics.render().decode()
    assert 'in_flight_requests{replica="a:1"} 0.0' in text and 'replica_healthy{replica="a:1"} 0.0' in text
