"""Model-free stand-ins for the engine's unit tests: sequences without a tokenizer, and a step that
"computes" what the scheduler scheduled."""
from __future__ import annotations

from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import SchedulerOutput
from pagedllm.engine.sequence import Sequence

SAMPLED = 99  # the token every fake step samples


def fake_sequence(request_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(request_id, list(token_ids), SamplingParams(max_tokens=64), detokenizer=None, arrival_time=0.0)


def run_step(out: SchedulerOutput) -> None:
    """What the model runner and sampler do to the sequences: tokens computed, one sampled where the
    whole sequence is computed."""
    for seq, n in out.scheduled:
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == len(seq.token_ids):
            seq.token_ids.append(SAMPLED)
