"""The engine's output side: which token ends a sequence and why (stop strings across token boundaries, stop
token ids after min_tokens, EOS unless ignore_eos, max_tokens, max_model_len), that nothing after it is
kept when a step hands several tokens, and when a sequence's tokens go out (stream_interval)."""
from __future__ import annotations

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import FinishReason, OutputKind, Sequence, SequenceStatus

EOS = 2
PROMPT = [1, 9690, 198]


def sequence(tokenizer, **params) -> Sequence:
    p = SamplingParams(temperature=0, **params)
    detokenizer = IncrementalDetokenizer(tokenizer, PROMPT, p.stop or [])
    return Sequence("r", list(PROMPT), p, detokenizer, arrival_time=0.0)


def feed(processor: OutputProcessor, seq: Sequence, tokens: list[int]) -> FinishReason | None:
    reason = processor.append(seq, tokens, [None] * len(tokens), now=1.0)
    if reason is not None:
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
    return reason


def test_a_stop_string_across_tokens_ends_the_sequence_and_is_cut(tokenizer):
    ids = tokenizer.encode(" Hello world, and more", add_special_tokens=False)
    seq = sequence(tokenizer, stop=["o wor"], max_tokens=50)
    reason = feed(OutputProcessor([EOS], 512), seq, ids)
    assert reason is FinishReason.STOP and seq.detokenizer.take_delta(True) == " Hell"
    assert seq.output_token_ids == ids[:len(seq.output_token_ids)] and len(seq.output_token_ids) < len(ids)


@pytest.mark.parametrize("params, tokens, reason, kept", [
    ({"stop_token_ids": [500]}, [7, 500, 8], FinishReason.STOP, 2),  # nothing after the ending token is kept
    ({"stop_token_ids": [500], "min_tokens": 3}, [500, 7, 500, 8], FinishReason.STOP, 3),  # not before min
    ({}, [7, EOS, 8], FinishReason.STOP, 2),
    ({"ignore_eos": True, "max_tokens": 3}, [7, EOS, 8, 9], FinishReason.LENGTH, 3),
    ({"max_tokens": 2}, [7, 8, 9], FinishReason.LENGTH, 2),
    ({}, [7, 8, 9, 10, 11, 12], FinishReason.LENGTH, 5),  # max_model_len 8 = 3 prompt + 5
    ({}, [7, 8], None, 2),
])
def test_which_token_ends_a_sequence(tokenizer, params, tokens, reason, kept):
    seq = sequence(tokenizer, **({"max_tokens": 50} | params))
    assert feed(OutputProcessor([EOS], max_model_len=8), seq, tokens) == reason
    assert seq.output_token_ids == tokens[:kept]


def test_tokens_go_out_first_at_once_then_every_stream_interval(tokenizer):
    processor, seq = OutputProcessor([EOS], 512, stream_interval=3), sequence(tokenizer, max_tokens=7)
    sent = []
    for token in [7, 8, 9, 10, 11, 12, 13]:
        feed(processor, seq, [token])
        if processor.ready_to_send(seq):
            sent.append(processor.take_delta(seq).new_token_ids)
    assert sent == [[7], [8, 9, 10], [11, 12, 13]]
    assert seq.finish_reason is FinishReason.LENGTH


def test_the_final_delta_carries_the_queue_time(tokenizer):
    processor, seq = OutputProcessor([EOS], 512), sequence(tokenizer, max_tokens=1)
    seq.first_scheduled_time = 0.25
    feed(processor, seq, [7])
    delta = processor.take_delta(seq)
    assert delta.finished and delta.queue_time == 0.25 and delta.num_prompt_tokens == 3


def test_a_final_only_sequence_sends_nothing_until_it_finishes(tokenizer):
    processor, seq = OutputProcessor([EOS], 512, stream_interval=1), sequence(tokenizer, max_tokens=3)
    seq.output_kind = OutputKind.FINAL_ONLY
    for token in [7, 8]:
        assert feed(processor, seq, [token]) is None and not processor.ready_to_send(seq)
    assert feed(processor, seq, [9]) is FinishReason.LENGTH and processor.ready_to_send(seq)
    assert processor.take_delta(seq).new_token_ids == [7, 8, 9]
