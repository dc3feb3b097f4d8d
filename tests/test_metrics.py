"""The llm model's Triton metrics (serving/metrics.py) with a fake MetricFamily."""
from __future__ import annotations

from pagedllm.serving.metrics import ServingMetrics


class _Family:
    """The shape of pb_utils.MetricFamily, recording what the serving code reports."""
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind

    def Metric(self, labels, buckets=None):  # noqa: N802 - Triton's name
        metric = _Metric()
        _Family.created[(self.name, tuple(sorted(labels.items())))] = metric
        return metric


class _Metric:
    def __init__(self):
        self.value, self.observed, self.sets = 0.0, [], 0

    def increment(self, v):
        self.value += v

    def set(self, v):
        self.value, self.sets = v, self.sets + 1

    def observe(self, v):
        self.observed.append(v)


def test_metrics_turn_engine_counters_into_increments():
    from pagedllm.engine.wire import EngineStats
    m = ServingMetrics(_Family, "llm", "1")
    m.on_stats(EngineStats(2, 1, 0.5, 10, 20, prefix_cache_queries=100, prefix_cache_hits=40, num_preemptions=0))
    m.on_stats(EngineStats(1, 0, 0.25, 15, 20, prefix_cache_queries=130, prefix_cache_hits=70, num_preemptions=1))
    m.on_tokens(1, 0.2, None)
    m.on_tokens(4, None, 0.05)
    m.on_finish("stop", 12, 1.5, 0.01)
    m.flush()
    labels = (("model", "llm"), ("version", "1"))
    get = lambda name, extra=(): _Family.created[(name, tuple(sorted(labels + extra)))]  # noqa: E731
    assert get("pagedllm_prefix_cache_hits_total").value == 70
    assert get("pagedllm_kv_cache_usage_ratio").value == 0.25
    assert get("pagedllm_time_to_first_token_seconds").observed == [0.2]
    assert get("pagedllm_request_success_total", (("finish_reason", "stop"),)).value == 1
    assert get("pagedllm_generation_tokens_total").value == 5 and get("pagedllm_prompt_tokens_total").value == 12
    # one observation per response: the same value 4 times would be 4 round trips to the Triton process
    assert get("pagedllm_inter_token_latency_seconds").observed == [0.05]
    # gauges are set only when they change: each set is a round trip too
    m.on_stats(EngineStats(1, 0, 0.5, 15, 20, prefix_cache_queries=130, prefix_cache_hits=70, num_preemptions=1))
    m.flush()
    assert get("pagedllm_kv_cache_usage_ratio").sets == 2 and get("pagedllm_num_requests_running").sets == 1


def test_failures_are_counted_by_code_and_every_code_exists_from_the_start():
    m = ServingMetrics(_Family, "llm2", "1")
    labels = (("model", "llm2"), ("version", "1"))
    get = lambda code: _Family.created[("pagedllm_request_failure_total",  # noqa: E731
                                        tuple(sorted(labels + (("code", code),))))]
    assert {get(code).value for code in ("invalid_argument", "overloaded", "engine_unavailable", "internal")} == {0}
    m.on_failure("overloaded")
    m.on_failure("overloaded")
    m.flush()
    assert get("overloaded").value == 2 and get("internal").value == 0


def test_the_kv_cache_capacity_is_reported_in_tokens_by_dtype_when_an_engine_is_ready():
    from pagedllm.engine.wire import EngineStats, Ready
    stats = EngineStats(0, 0, 0.0, 1412, 1412, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)
    m = ServingMetrics(_Family, "llm3", "1")
    labels = (("model", "llm3"), ("version", "1"))
    capacity = lambda dtype: _Family.created[("pagedllm_kv_cache_capacity_tokens",  # noqa: E731
                                              tuple(sorted(labels + (("kv_cache_dtype", dtype),))))]
    assert ("pagedllm_kv_cache_capacity_tokens", labels) not in _Family.created  # only ever with its dtype
    m.on_ready(Ready(1412, 2048, "cpu kernels", stats, block_size=16, kv_cache_dtype="int8"))
    m.flush()
    assert capacity("int8").value == 1412 * 16
    m.flush()
    assert capacity("int8").sets == 1  # set once per engine: each set is a round trip
    m.on_restart(Ready(1400, 2048, "cpu kernels", stats, block_size=16, kv_cache_dtype="int8"))
    m.flush()
    assert capacity("int8").value == 1400 * 16 and capacity("int8").sets == 2
    assert _Family.created[("pagedllm_engine_restarts_total", labels)].value == 1
