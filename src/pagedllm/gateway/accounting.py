"""What every request leaves behind when it ends, however it ends: its quota ticket settled with the tokens it
used, one JSON log line (never the prompt or the output) and the gateway's metrics."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from pagedllm.gateway.answers import Answer
from pagedllm.gateway.errors import GatewayError
from pagedllm.gateway.metrics import GatewayMetrics
from pagedllm.gateway.quotas import Ticket

access_log = logging.getLogger("pagedllm.gateway.access")
REJECTED = (401, 403, 413, 429, 503)  # the statuses counted as refusals, by reason


@dataclass
class RequestRecord:
    """The request's log line: never the prompt or the output."""
    request_id: str
    key: str = "-"
    model: str | None = None
    adapter: str | None = None  # the LoRA adapter it ran with
    replica: str | None = None
    routing: dict | None = None  # why that replica: routing.py's reason, and how much of the prompt it held
    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token: float | None = None
    duration: float = 0.0
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None
    error_detail: str | None = None  # what the server said of a 5xx it failed (never the prompt)
    started: float = field(default_factory=time.monotonic, repr=False)

    def saw_text(self) -> None:
        """Text reached the answer: the first time, that is the time to first token."""
        if self.time_to_first_token is None:
            self.time_to_first_token = time.monotonic() - self.started


class Accounting:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def finish(self, record: RequestRecord, ticket: Ticket | None, answer: Answer | None, status: int,
               error: GatewayError | None = None) -> None:
        record.status, record.duration = status, time.monotonic() - record.started
        if answer is not None:
            usage = answer.usage()
            record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
            reasons = {out.finish_reason for out in answer.outputs if out.finish_reason}
            record.finish_reason = ",".join(sorted(reasons)) or None
        if ticket is not None:
            ticket.settle(record.prompt_tokens + record.completion_tokens)
        if error is not None:
            record.error = error.code or type(error).__name__
            record.error_detail = getattr(error, "detail", None)
            if status in REJECTED:
                self.metrics.rejections.labels(record.error).inc()
        self._observe(record)
        access_log.info(json.dumps({k: v for k, v in asdict(record).items() if k != "started"}))

    def _observe(self, record: RequestRecord) -> None:
        m, model = self.metrics, record.model or "-"
        m.requests.labels(record.key, model, str(record.status)).inc()
        if record.adapter:
            m.adapter_requests.labels(record.adapter, str(record.status)).inc()
        m.tokens.labels(record.key, "prompt").inc(record.prompt_tokens)
        m.tokens.labels(record.key, "completion").inc(record.completion_tokens)
        if record.status == 200 and not record.cancelled:
            m.e2e.labels(model).observe(record.duration)
            if record.time_to_first_token is not None:
                m.ttft.labels(model).observe(record.time_to_first_token)
