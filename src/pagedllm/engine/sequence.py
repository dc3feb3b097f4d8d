"""A request's state inside the engine, and what the engine hands back: deltas and RequestOutput."""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.errors import RequestError
from pagedllm.kv_events import ROOT

if TYPE_CHECKING:
    import torch


class FinishReason(enum.StrEnum):
    """Why a sequence ended, as vLLM and OpenAI's API name it."""
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled, failed, or the engine went away


@dataclass
class TokenLogprobs:
    """One generated token's log-probability under the model's raw distribution, and the `top` N
    alternatives (vLLM's `logprobs=N`: the sampled token is reported whether or not it is among them)."""
    token_id: int
    logprob: float
    top: dict[int, float]


class OutputKind(enum.Enum):
    """When a request's deltas go out, as vLLM's RequestOutputKind: every `stream_interval` tokens, or only the
    final one (LLM.generate reads nothing else; without stop strings its text is then decoded once, at the end)."""
    DELTA = "delta"
    FINAL_ONLY = "final_only"


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival_time: float
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_sent_tokens: int = 0  # output tokens already handed out in a RequestDelta
    # Speculative tokens proposed for this step (speculative.py): computed with the sequence's next token,
    # and kept, up to the first one the model disagrees with, only once verified.
    draft_token_ids: list[int] = field(default_factory=list)
    grammar: Any = None  # a constrained sequence's xgrammar matcher, at the end of its output (structured_output.py)
    lora_name: str | None = None  # the adapter it runs with (lora.py), None for the base model
    cache_root: int = ROOT  # where its prefix-cache hash chain starts: its adapter's (lora.py), else the base model's
    output_kind: OutputKind = OutputKind.DELTA
    num_prompt_tokens: int = field(init=False)  # a field, not a property: every step reads it for every sequence

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + len(self.draft_token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(kw_only=True)
class RequestDelta:
    """What one step produced for one request; the concatenated `new_text`s are the final text."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprobs] | None = None
    error: RequestError | None = None
    queue_time: float | None = None  # on the final delta: arrival to first scheduled

    @classmethod
    def failure(cls, request_id: str, error: RequestError, num_prompt_tokens: int = 0) -> RequestDelta:
        """The final delta of a request that ends with an error."""
        return cls(request_id=request_id, new_token_ids=[], new_text="", finish_reason=FinishReason.ABORT,
                   num_prompt_tokens=num_prompt_tokens, num_output_tokens=0, error=error)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def merged(self, later: RequestDelta) -> RequestDelta:
        """This delta followed by a later one of the same request, as one."""
        logprobs = None
        if self.new_logprobs is not None or later.new_logprobs is not None:
            logprobs = (self.new_logprobs or []) + (later.new_logprobs or [])
        return replace(later, new_token_ids=self.new_token_ids + later.new_token_ids,
                       new_text=self.new_text + later.new_text, new_logprobs=logprobs)


def coalesce(deltas: list[RequestDelta]) -> list[RequestDelta]:
    """Merge the deltas of each request into one, in order of each request's first delta."""
    merged: dict[str, RequestDelta] = {}
    for delta in deltas:
        earlier = merged.get(delta.request_id)
        merged[delta.request_id] = delta if earlier is None or earlier.finished else earlier.merged(delta)
    return list(merged.values())


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_cached_tokens: int = 0

    @classmethod
    def from_sequence(cls, seq: Sequence) -> RequestOutput:
        return cls(seq.request_id, list(seq.prompt_token_ids), seq.output_token_ids, seq.detokenizer.output_text,
                   seq.finish_reason, seq.logprobs if seq.params.logprobs is not None else None,
                   seq.arrival_time, seq.first_token_time, seq.finish_time, seq.num_cached_tokens)


DeltaCallback = Callable[[RequestDelta], None]  # where a request's deltas go
