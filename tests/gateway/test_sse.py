"""The SSE writer: a stream opens and closes as its API wants, an error after the first event is the last
event, a client that leaves marks the request cancelled, and the request is settled once in every case."""
from __future__ import annotations

import asyncio
import json

from pagedllm.gateway.accounting import RequestRecord
from pagedllm.gateway.answers import Answer
from pagedllm.gateway.errors import GatewayError, ServiceUnavailableError
from pagedllm.gateway.protocol import parse
from pagedllm.gateway.sse import write_events
from pagedllm_client import Chunk
from tests.gateway.bodies import CHAT


async def engine(chunks: list, closed: list) -> object:
    try:
        for chunk in chunks:
            if isinstance(chunk, Exception):
                raise chunk
            yield 0, chunk
            await asyncio.sleep(0)
    finally:
        closed.append(True)


def stream(chunks: list, leave_after: int | None = None) -> tuple[list[dict | str], list, RequestRecord, list]:
    answer = Answer(parse("chat", CHAT | {"stream": True, "stream_options": {"include_usage": True}}))
    finished, closed, record = [], [], RequestRecord("req_1")

    async def run() -> list[bytes]:
        events = engine(chunks, closed)
        first = await anext(events)
        out = []
        writer = write_events(answer, first, events, record, lambda *end: finished.append(end))
        async for data in writer:
            out.append(data)
            if len(out) == leave_after:  # as Starlette cancels a response whose client left
                await writer.athrow(asyncio.CancelledError())
        return out
    try:
        sent = asyncio.run(run())
    except asyncio.CancelledError:
        sent = []
    events = [e.removeprefix(b"data: ").strip().decode() for e in sent]
    return [e if e == "[DONE]" else json.loads(e) for e in events], finished, record, closed


def test_a_whole_stream_opens_with_the_role_and_closes_with_usage_and_done():
    events, finished, record, closed = stream([Chunk("Hel", False), Chunk("lo", True, "stop", 5, 2)])
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:3]) == "Hello"
    assert events[-2]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"
    assert finished == [(200, None)] and record.time_to_first_token is not None and closed == [True]


def test_an_error_after_the_stream_began_is_its_last_event():
    error = ServiceUnavailableError("engine went away", None, "overloaded", 1.0)
    events, finished, record, closed = stream([Chunk("Hel", False), error])
    assert events[-1] == {"error": {"message": "engine went away", "type": "service_unavailable", "param": None,
                                    "code": "overloaded"}}
    assert finished == [(503, error)] and closed == [True]


def test_a_bug_mid_stream_is_a_500_event_that_names_only_its_kind():
    events, finished, _, _ = stream([Chunk("Hel", False), KeyError("/opt/secret/path")])
    assert events[-1]["error"]["type"] == "server_error" and "/opt" not in json.dumps(events[-1])
    assert finished[0][0] == 500 and isinstance(finished[0][1], GatewayError)


def test_a_client_that_leaves_cancels_and_the_request_is_settled_once():
    _, finished, record, closed = stream([Chunk("a", False), Chunk("b", False), Chunk("c", True, "stop")],
                                         leave_after=2)
    assert record.cancelled and closed == [True] and finished == [(200, None)]
