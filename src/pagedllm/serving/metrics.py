"""Engine metrics on Triton's /metrics, through the Python backend's metrics API.

`ServingMetrics` takes the backend's `MetricFamily` class, so the same code runs inside tritonserver
(pb_utils.MetricFamily) and in unit tests (any class with the same shape)."""
from __future__ import annotations

import threading
from typing import Any

from pagedllm.engine.wire import EngineStats, Ready
from pagedllm.errors import ErrorCode

LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0]

HISTOGRAMS = {
    "pagedllm_time_to_first_token_seconds": "Time from arrival to the first output token",
    "pagedllm_inter_token_latency_seconds": "Time between consecutive output tokens of a request",
    "pagedllm_e2e_request_latency_seconds": "Time from arrival to the final response",
    "pagedllm_request_queue_time_seconds": "Time from arrival to first scheduled",
}
COUNTERS = {
    "pagedllm_prompt_tokens_total": "Prompt tokens of finished requests",
    "pagedllm_generation_tokens_total": "Generated tokens",
    "pagedllm_prefix_cache_queries_total": "Prompt tokens looked up in the prefix cache",
    "pagedllm_prefix_cache_hits_total": "Prompt tokens found in the prefix cache",
    "pagedllm_request_success_total": "Requests finished, by finish reason",
    "pagedllm_request_failure_total": "Requests that ended with an error (refused, or failed in the engine), by code",
    "pagedllm_preemptions_total": "Requests preempted for KV blocks",
    "pagedllm_engine_restarts_total": "Engine process restarts, after it died or hung",
    "pagedllm_spec_decode_num_draft_tokens_total": "Speculative draft tokens proposed",
    "pagedllm_spec_decode_num_accepted_tokens_total": "Speculative draft tokens accepted (kept after verification)",
}
GAUGES = {
    "pagedllm_num_requests_running": "Requests in the running batch",
    "pagedllm_num_requests_waiting": "Requests waiting to be scheduled",
    "pagedllm_kv_cache_usage_ratio": "Fraction of KV-cache blocks in use",
    "pagedllm_kv_cache_free_blocks": "KV-cache blocks free",
    "pagedllm_kv_cache_capacity_tokens": "Tokens the KV cache holds when full (its blocks times block_size), "
                                         "by what it stores them as (kv_cache_dtype)",
    "pagedllm_last_step_timestamp_seconds": "Unix time of the engine's last step (time() minus this: time since)",
}


class ServingMetrics:
    """Every call into the backend's metrics API is a round trip to the Triton process, so the hot
    paths only record: `on_stats` keeps the latest engine stats, `on_tokens` / `on_finish` queue
    observations, and `flush` (called every few tens of milliseconds) reports them."""

    def __init__(self, metric_family: Any, model: str, version: str) -> None:
        self.labels = {"model": model, "version": str(version)}
        self._lock = threading.Lock()
        self._families = []  # held for the model's life: a family dropped is a family unregistered
        histograms = {n: self._family(metric_family, n, d, metric_family.HISTOGRAM) for n, d in HISTOGRAMS.items()}
        self.hist = {n: f.Metric(labels=self.labels, buckets=LATENCY_BUCKETS) for n, f in histograms.items()}
        counters = {n: self._family(metric_family, n, d, metric_family.COUNTER) for n, d in COUNTERS.items()}
        labelled = ("pagedllm_request_success_total", "pagedllm_request_failure_total")
        self.counters = {n: f.Metric(labels=self.labels) for n, f in counters.items() if n not in labelled}
        self._success_family = counters["pagedllm_request_success_total"]
        self._success: dict[str, Any] = {}
        # every code from the start: an error rate's denominator and numerator both exist before the first error
        self._failure = {code.value: counters["pagedllm_request_failure_total"].Metric(
            labels={**self.labels, "code": code.value}) for code in ErrorCode}
        gauges = {n: self._family(metric_family, n, d, metric_family.GAUGE) for n, d in GAUGES.items()}
        self.gauges = {n: f.Metric(labels=self.labels) for n, f in gauges.items()
                       if n != "pagedllm_kv_cache_capacity_tokens"}
        self._capacity_family = gauges["pagedllm_kv_cache_capacity_tokens"]
        self._capacity_series: dict[str, Any] = {}  # by kv_cache_dtype
        self._capacity: tuple[str, int] | None = None  # (kv_cache_dtype, tokens) of the engine last ready
        self._reported_capacity: tuple[str, int] | None = None
        self._last_stats: EngineStats | None = None  # as last reported
        self._stats: EngineStats | None = None  # as last seen
        self._generated = 0
        self._observations: list[tuple[str, float]] = []
        self._finished: list[tuple[str, int]] = []
        self._failed: list[str] = []
        self._restarts = 0
        self._last_step: float | None = None
        self._reported_step: float | None = None

    def _family(self, metric_family: Any, name: str, description: str, kind: Any) -> Any:
        family = metric_family(name=name, description=description, kind=kind)
        self._families.append(family)
        return family

    def on_stats(self, stats: EngineStats, last_step: float | None = None) -> None:
        """After every step: only remembered here."""
        self._stats = stats
        self._last_step = last_step or self._last_step

    def on_ready(self, ready: Ready) -> None:
        """An engine is ready, first or restarted: its KV cache's capacity, reported at the next flush."""
        self._capacity = (ready.kv_cache_dtype, ready.num_blocks * ready.block_size)

    def on_restart(self, ready: Ready) -> None:
        """A new engine: its cumulative stats count from zero again."""
        with self._lock:
            self._restarts += 1
            self._last_stats = None
        self.on_ready(ready)

    def on_tokens(self, count: int, first_token_latency: float | None, inter_token_latency: float | None) -> None:
        """`count` tokens sent in one response; `inter_token_latency` is the gap since the previous response
        divided among its tokens. It is observed once per response, not once per token: the same value
        `count` times would cost `count` round trips. With `stream_interval` 1 that is per token, as vLLM."""
        with self._lock:
            self._generated += count
            if first_token_latency is not None:
                self._observations.append(("pagedllm_time_to_first_token_seconds", first_token_latency))
            if inter_token_latency is not None:
                self._observations.append(("pagedllm_inter_token_latency_seconds", inter_token_latency))

    def on_finish(self, reason: str, num_prompt_tokens: int, e2e: float, queue_time: float | None) -> None:
        with self._lock:
            self._finished.append((reason, num_prompt_tokens))
            self._observations.append(("pagedllm_e2e_request_latency_seconds", e2e))
            if queue_time is not None:
                self._observations.append(("pagedllm_request_queue_time_seconds", queue_time))

    def on_failure(self, code: str) -> None:
        """A request's final response is an error: counted by its code, not as finished."""
        with self._lock:
            self._failed.append(code)

    def flush(self) -> None:
        with self._lock:
            generated, self._generated = self._generated, 0
            observations, self._observations = self._observations, []
            finished, self._finished = self._finished, []
            failed, self._failed = self._failed, []
            restarts, self._restarts = self._restarts, 0
        if restarts:
            self.counters["pagedllm_engine_restarts_total"].increment(restarts)
        capacity = self._capacity  # set by the engine's watch thread when it restarts
        if capacity is not None and capacity != self._reported_capacity:
            self._reported_capacity = dtype, tokens = capacity
            self._capacity_metric(dtype).set(tokens)
        if self._last_step is not None and self._last_step != self._reported_step:
            self._reported_step = self._last_step
            self.gauges["pagedllm_last_step_timestamp_seconds"].set(self._last_step)
        if generated:
            self.counters["pagedllm_generation_tokens_total"].increment(generated)
        for name, value in observations:
            self.hist[name].observe(value)
        prompt_tokens = sum(n for _, n in finished)
        if prompt_tokens:
            self.counters["pagedllm_prompt_tokens_total"].increment(prompt_tokens)
        for reason, _ in finished:
            self._success_metric(reason).increment(1)
        for code in failed:
            self._failure[code].increment(1)
        self._report_stats()

    def _report_stats(self) -> None:
        stats, last = self._stats, self._last_stats
        if stats is None or stats is last:
            return
        for name, attr in (("pagedllm_num_requests_running", "num_running"),
                           ("pagedllm_num_requests_waiting", "num_waiting"),
                           ("pagedllm_kv_cache_usage_ratio", "kv_cache_usage"),
                           ("pagedllm_kv_cache_free_blocks", "num_free_blocks")):
            if last is None or getattr(stats, attr) != getattr(last, attr):  # each set is a round trip
                self.gauges[name].set(getattr(stats, attr))
        for name, attr in (("pagedllm_prefix_cache_queries_total", "prefix_cache_queries"),
                           ("pagedllm_prefix_cache_hits_total", "prefix_cache_hits"),
                           ("pagedllm_preemptions_total", "num_preemptions"),
                           ("pagedllm_spec_decode_num_draft_tokens_total", "num_draft_tokens"),
                           ("pagedllm_spec_decode_num_accepted_tokens_total", "num_accepted_tokens")):
            delta = getattr(stats, attr) - (getattr(last, attr) if last else 0)
            if delta > 0:
                self.counters[name].increment(delta)
        self._last_stats = stats

    def _capacity_metric(self, kv_cache_dtype: str) -> Any:
        return self._series(self._capacity_series, self._capacity_family, "kv_cache_dtype", kv_cache_dtype)

    def _success_metric(self, reason: str) -> Any:
        return self._series(self._success, self._success_family, "finish_reason", reason)

    def _series(self, made: dict[str, Any], family: Any, label: str, value: str) -> Any:
        """`family`'s series for this model with `label` = `value`, made the first time it is asked for."""
        if value not in made:
            made[value] = family.Metric(labels={**self.labels, label: value})
        return made[value]
