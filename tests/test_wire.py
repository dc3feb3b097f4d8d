"""The engine pipe's messages: each crosses a real pipe as itself, a receiver refuses a kind it does not take,
and exits are described by name."""
from __future__ import annotations

import multiprocessing

import pytest

from pagedllm.engine import wire
from pagedllm.engine.engine_process import describe_exit
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import FinishReason, RequestDelta
from pagedllm.errors import ErrorCode, RequestError
from pagedllm.kv_events import BlockEvents

STATS = wire.EngineStats(1, 2, 0.5, 10, 20, 3, 1, 0)


@pytest.mark.parametrize("message", [
    wire.Submit("r1", [1, 2, 3], SamplingParams(max_tokens=4), 12.5),
    wire.Abort("r1"),
    wire.Shutdown(),
    wire.Ready(num_blocks=64, max_model_len=512, compute_path="cpu kernels", stats=STATS, block_size=16,
               kv_cache_dtype="int8"),
    wire.StartFailed("ValueError: no model"),
    wire.StepOutput([RequestDelta(request_id="r1", new_token_ids=[7], new_text="hi", finish_reason=FinishReason.LENGTH,
                                   num_prompt_tokens=3, num_output_tokens=1)], STATS, 1.0),
    wire.StepOutput([], STATS, 2.0, BlockEvents(stored=(1, 2**64 - 1), evicted=(5,))),
    wire.StepOutput([RequestDelta.failure("r2", RequestError(ErrorCode.OVERLOADED, "9 waiting"), 3)]),
], ids=lambda m: type(m).__name__)
def test_each_message_crosses_a_pipe_as_itself(message):
    sender, receiver = multiprocessing.Pipe()
    wire.send(sender, message)
    assert wire.receive(receiver, type(message)) == message


def test_a_kind_the_receiver_does_not_take_is_refused():
    sender, receiver = multiprocessing.Pipe()
    wire.send(sender, wire.Abort("r1"))
    with pytest.raises(wire.WireError, match="unexpected Abort"):
        wire.receive(receiver, (wire.Ready, wire.StartFailed))


def test_exits_are_described_by_name():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(wire.EngineExit.INJECTED_FAULT) == "exited with code 71 (injected fault)"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(70, "hung: no step for 2.0 s") == "hung: no step for 2.0 s"
