"""The llm model's stream bookkeeping (serving/streams.py) with fake senders, no server: cadence,
coalescing, the order cancellations are checked in, and one final response per request whatever raises."""
from __future__ import annotations

import numpy as np
import pytest

from pagedllm.engine.sequence import FinishReason, RequestDelta
from pagedllm.errors import ErrorCode, InvalidRequestError, RequestError
from pagedllm.serving.llm import LLMModel, require_decoupled
from pagedllm.serving.request import ResponseOptions
from pagedllm.serving.response import RESPONSE_OPTIONS
from pagedllm.serving.streams import Streams

FINAL = 1


class FakeResponses:
    final_flag = FINAL
    fail_building = False

    def response(self, tensors):
        if self.fail_building:
            raise RuntimeError("building failed")
        return ("response", tensors)

    def error(self, error):
        return ("error", str(error), error.code)


class FakeSender:
    def __init__(self, fail_final: bool = False):
        self.sent, self.cancelled, self.fail_final = [], False, fail_final

    def send(self, response=None, flags=0):
        if flags == FINAL and self.fail_final:
            self.fail_final = False  # the first final send raises, as a closed stream's does
            raise RuntimeError("stream closed")
        self.sent.append((response, flags))

    def is_cancelled(self):
        return self.cancelled

    @property
    def finals(self):
        return [r for r, flags in self.sent if flags == FINAL]

    def texts(self):
        return [r[1]["text_output"][0].decode() for r, _ in self.sent if r is not None and r[0] == "response"]


class Recorder:
    def __init__(self):
        self.tokens, self.finished, self.failed, self.flushes = [], [], [], 0

    def on_tokens(self, count, first, gap):
        self.tokens.append(count)

    def on_finish(self, reason, num_prompt_tokens, e2e, queue_time):
        self.finished.append(reason)

    def on_failure(self, code):
        self.failed.append(code)

    def flush(self):
        self.flushes += 1


def delta(rid, text, tokens=1, reason=None, **kw):
    return RequestDelta(request_id=rid, new_token_ids=[7] * tokens, new_text=text, finish_reason=reason,
                        num_prompt_tokens=3, num_output_tokens=tokens, **kw)


@pytest.fixture
def book():
    aborted = []
    streams = Streams(FakeResponses(), aborted.append, Recorder(), str, poll_seconds=0.0, checks_per_poll=2)
    streams.aborted = aborted
    return streams


def test_a_stream_gets_a_response_per_new_text_and_one_final(book):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions(stream=True, return_num_output_tokens=True))
    for d in (delta("a", "He"), delta("a", ""), delta("a", "llo", reason=FinishReason.STOP)):
        book.deliver(d)
        book.run_once()
    assert sender.texts() == ["He", "llo"] and len(sender.finals) == 1 and len(book) == 0
    # the held-back token is counted in the response that carries its text, as Triton's vLLM backend does
    assert [int(r[1]["num_output_tokens"][0]) for r, _ in sender.sent] == [1, 2]
    assert book.metrics.finished == ["stop"] and book.metrics.tokens == [1, 1, 1]


def test_waiting_deltas_of_a_request_go_out_as_one_response(book):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions(stream=True))
    for text in ("a", "b", "c"):
        book.deliver(delta("a", text))
    book.run_once()
    assert sender.texts() == ["abc"] and sender.finals == []


def test_not_streamed_is_one_answer_at_the_end(book):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions())
    book.deliver(delta("a", "Hel"))
    book.run_once()
    book.deliver(delta("a", "lo", reason=FinishReason.LENGTH))
    book.run_once()
    assert sender.texts() == ["Hello"] and len(sender.sent) == 1 and sender.sent[0][1] == FINAL


def test_in_the_ensemble_the_response_options_go_to_postprocessing_unshaped(book):
    sender, options = FakeSender(), np.array([b"{}"], dtype=np.object_)
    book.open("a", sender, ResponseOptions(prompt_text="Q: "), options)
    book.deliver(delta("a", "A", reason=FinishReason.STOP))
    book.run_once()
    tensors = sender.finals[0][1]
    assert tensors[RESPONSE_OPTIONS] is options and tensors["text_output"][0] == b"A"


def test_cancellations_are_checked_a_few_at_a_time_longest_unchecked_first(book):
    senders = {rid: FakeSender() for rid in "abcde"}
    for rid, sender in senders.items():
        book.open(rid, sender, ResponseOptions(stream=True))
        sender.cancelled = rid in "bd"
    checked = []
    for _ in range(3):
        before = {rid: s.cancel_checked for rid, s in book._open.items()}
        book.run_once()
        checked.append({rid for rid, s in book._open.items() if s.cancel_checked != before[rid]})
    assert [len(c) for c in checked] == [2, 2, 2] and set().union(*checked[:3]) == set("abcde")
    assert sorted(set(book.aborted)) == ["b", "d"]


def test_an_abort_of_a_cancelled_stream_ends_it_with_the_final_flag_only(book):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions(stream=True))
    sender.cancelled = True
    book.deliver(delta("a", "x", reason=FinishReason.ABORT))
    book.run_once()
    assert sender.sent == [(None, FINAL)]


def test_an_error_delta_is_the_final_response(book):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions(stream=True))
    died = RequestError(ErrorCode.ENGINE_UNAVAILABLE, "engine died: killed; retry the request")
    book.deliver(RequestDelta.failure("a", died))
    book.run_once()
    assert sender.sent == [(("error", "engine died: killed; retry the request", "engine_unavailable"), FINAL)]
    assert book.metrics.failed == ["engine_unavailable"] and book.metrics.finished == []  # counted by its code


@pytest.mark.parametrize("fault", ["building", "sending"])
def test_the_final_response_is_sent_whatever_raises(book, fault):
    sender = FakeSender(fail_final=fault == "sending")
    book.responses.fail_building = fault == "building"
    book.open("a", sender, ResponseOptions())
    book.deliver(delta("a", "x", reason=FinishReason.STOP))
    book.run_once()
    assert len(sender.finals) == 1 and sender.finals[0][0] == "error" and sender.finals[0][2] == "internal"
    assert len(book) == 0
    book.responses.fail_building = False
    other = FakeSender()
    book.open("b", other, ResponseOptions())
    book.deliver(delta("b", "ok", reason=FinishReason.STOP))
    book.run_once()
    assert other.texts() == ["ok"]


def test_stop_aborts_open_streams_and_each_gets_its_final_response():
    def abort(rid):
        streams.deliver(delta(rid, "", tokens=0, reason=FinishReason.ABORT))
    streams = Streams(FakeResponses(), abort, Recorder(), str, poll_seconds=0.01)
    senders = [FakeSender() for _ in range(3)]
    for i, sender in enumerate(senders):
        streams.open(str(i), sender, ResponseOptions(stream=True))
    streams.start()
    streams.stop(timeout=5)
    assert all(len(s.finals) == 1 for s in senders) and len(streams) == 0


class _Request:
    def __init__(self, sender):
        self.sender = sender

    def get_response_sender(self):
        return self.sender


class _Backend:
    def __init__(self, error):
        self.error_to_raise = error

    def inputs(self, request):
        raise self.error_to_raise


@pytest.mark.parametrize("error, code", [(InvalidRequestError("text_input", "is empty"), "invalid_argument"),
                                         (KeyError("surprise"), "internal")])
def test_the_llm_model_answers_every_request_it_cannot_accept(error, code):
    model = LLMModel()
    model.backend = _Backend(error)
    model.streams = Streams(FakeResponses(), lambda rid: None, Recorder(), str)
    sender = FakeSender()
    model._accept(_Request(sender))
    assert len(sender.sent) == 1 and sender.sent[0][1] == FINAL and sender.sent[0][0][2] == code
    assert ("surprise" in sender.sent[0][0][1]) is False  # the server's own words stay in its log
    assert (str(error) in sender.sent[0][0][1]) == (code != "internal")
    assert len(model.streams) == 0 and model.streams.metrics.failed == [code]


def test_an_internal_error_reaches_the_client_as_the_request_id_only(book, caplog):
    sender = FakeSender()
    book.open("a", sender, ResponseOptions(stream=True))
    book.deliver(RequestDelta.failure("a", RequestError(ErrorCode.INTERNAL, "engine failed: /srv/secret.bin: bad")))
    book.run_once()
    assert sender.sent == [(("error", "internal error in request a; the server's log has the detail", "internal"),
                            FINAL)]
    assert "/srv/secret.bin" in caplog.text


def test_the_llm_model_must_be_decoupled():
    require_decoupled({"model_transaction_policy": {"decoupled": True}}, "llm")
    with pytest.raises(ValueError, match="decoupled: true"):
        require_decoupled({}, "llm")
