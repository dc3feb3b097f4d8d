"""The engine's request vocabulary (engine/sequence.py): deltas, their merging."""
from __future__ import annotations

from pagedllm.engine.sequence import FinishReason, RequestDelta, coalesce
from pagedllm.errors import ErrorCode, RequestError


def test_coalesce_merges_each_requests_deltas_in_order():
    def d(rid, tok, text, reason=None):
        return RequestDelta(request_id=rid, new_token_ids=[tok], new_text=text, finish_reason=reason,
                            num_prompt_tokens=3, num_output_tokens=tok)
    out = coalesce([d("a", 1, "He"), d("b", 1, "X"), d("a", 2, "llo"), d("a", 3, "!", FinishReason.STOP)])
    assert [(o.request_id, o.new_token_ids, o.new_text, o.finish_reason, o.num_output_tokens) for o in out] == [
        ("a", [1, 2, 3], "Hello!", "stop", 3), ("b", [1], "X", None, 1)]


def test_a_finished_delta_is_not_merged_with_a_later_one():
    first = RequestDelta.failure("a", RequestError(ErrorCode.OVERLOADED, "9 waiting"))
    later = RequestDelta(request_id="a", new_token_ids=[1], new_text="x", finish_reason=None, num_prompt_tokens=1,
                         num_output_tokens=1)
    assert coalesce([first, later]) == [later]
