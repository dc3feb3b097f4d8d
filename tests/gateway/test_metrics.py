"""The gateway's metrics read each replica's health and load at scrape time, and publish the engines' own load
under vLLM's names."""
from __future__ import annotations

from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.replicas import ReplicaPool
from pagedllm.kv_events import CacheState, ReplicaLoad


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


def test_the_engines_load_is_published_under_vllms_names_for_an_endpoint_picker():
    pool = ReplicaPool(["a:1", "b:1", "c:1"], ["llm"])
    metrics = GatewayMetrics(pool)
    loads = [ReplicaLoad(3, 1, 0.5, 100, 4, ("sql",), ("poet",), "bfloat16"),
             ReplicaLoad(1, 0, 0.25, 100, 4, ("poet",), (), "bfloat16")]
    for replica, load in zip(pool.replicas, loads):
        replica.healthy, replica.models = True, {"llm"}
        replica.prefix_index("llm").update(CacheState("e", 1, 16, True, [], [], load))
    pool.replicas[2].healthy, pool.replicas[2].models = True, {"llm"}  # not reporting: left out
    text = metrics.render().decode()
    assert 'vllm:num_requests_running{model_name="llm"} 4.0' in text
    assert 'vllm:num_requests_waiting{model_name="llm"} 1.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="llm"} 0.375' in text
    assert 'vllm:gpu_cache_usage_perc{model_name="llm"} 0.375' in text
    assert 'vllm:cache_config_info{block_size="16",cache_dtype="bfloat16",enable_prefix_caching="True",' \
           'model_name="llm",num_gpu_blocks="200"} 1.0' in text
    assert 'pagedllm_gateway_kv_cache_capacity_tokens{kv_cache_dtype="bfloat16",model="llm"} 3200.0' in text
    lora = next(line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="4"' in lora and 'running_lora_adapters="poet,sql"' in lora
    assert 'waiting_lora_adapters="poet"' in lora


def test_replicas_whose_caches_differ_are_reported_apart_and_a_scrape_forgets_what_left():
    pool = ReplicaPool(["a:1", "b:1", "c:1"], ["llm"])
    metrics = GatewayMetrics(pool)
    states = [CacheState("e", 1, 16, True, [], [], ReplicaLoad(num_blocks=1412, kv_cache_dtype="int8")),
              CacheState("e", 1, 16, True, [], [], ReplicaLoad(num_blocks=728, kv_cache_dtype="bfloat16")),
              CacheState("e", 1, 16, True, [], [], ReplicaLoad(num_blocks=728))]  # an earlier version's replica
    for replica, state in zip(pool.replicas, states):
        replica.healthy, replica.models = True, {"llm"}
        replica.prefix_index("llm").update(state)
    lines = metrics.render().decode().splitlines()
    capacity = {line for line in lines if line.startswith("pagedllm_gateway_kv_cache_capacity_tokens{")}
    assert capacity == {'pagedllm_gateway_kv_cache_capacity_tokens{kv_cache_dtype="int8",model="llm"} 22592.0',
                        'pagedllm_gateway_kv_cache_capacity_tokens{kv_cache_dtype="bfloat16",model="llm"} 11648.0',
                        'pagedllm_gateway_kv_cache_capacity_tokens{kv_cache_dtype="auto",model="llm"} 11648.0'}
    configs = [line for line in lines if line.startswith("vllm:cache_config_info{")]
    assert len(configs) == 3 and any('cache_dtype="int8"' in c and 'num_gpu_blocks="1412"' in c for c in configs)
    pool.replicas[0].models = set()  # no longer serves it: its cache leaves the sums
    text = metrics.render().decode()
    assert 'kv_cache_dtype="int8"' not in text and 'cache_dtype="int8"' not in text
