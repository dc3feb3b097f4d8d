"""The server-sent-events writer: a streamed answer's events as the engine's chunks arrive, opened and closed
as its API wants (answers.py, responses_api.py shape them). An error after the stream began is its last event;
a client that leaves cancels the engine requests as the streams close. Either way `finish` runs once."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from pagedllm.gateway.accounting import RequestRecord
from pagedllm.gateway.answers import Answer
from pagedllm.gateway.errors import GatewayError, UpstreamError
from pagedllm.gateway.generation import Event

logger = logging.getLogger("pagedllm.gateway")


async def write_events(answer: Answer, first: Event, events: AsyncIterator[Event], record: RequestRecord,
                       finish: Callable[[int, GatewayError | None], None]) -> AsyncIterator[bytes]:
    """`first` was already taken from `events` (an error before it is an HTTP error, not an event);
    `finish(status, error)` settles the request when the stream ends."""
    error: GatewayError | None = None
    try:
        for chunk in answer.opening_chunks():
            yield answer.encode(chunk)
        event: Event | None = first
        while event is not None:
            for chunk in fold(answer, event, record):
                yield answer.encode(chunk)
            event = await anext(events, None)
        for chunk in answer.closing_chunks():
            yield answer.encode(chunk)
    except Exception as e:
        if not isinstance(e, GatewayError):
            logger.exception("request %s failed", record.request_id)
        error = e if isinstance(e, GatewayError) else internal_error(e)
        yield answer.encode(answer.error_event(error.body()))
    except BaseException:  # the client left
        record.cancelled = True
        raise
    finally:
        await events.aclose()
        finish(error.status if error else 200, error)


def fold(answer: Answer, event: Event, record: RequestRecord) -> list[dict]:
    """One engine response into the answer (and the record's time to first token); the chunks it makes."""
    index, chunk = event
    if chunk.text:
        record.saw_text()
    return answer.add(index, chunk)


def internal_error(error: Exception) -> UpstreamError:
    """A bug of ours, as the client sees it: a 500 that says so (the log has the traceback)."""
    return UpstreamError(f"internal gateway error ({type(error).__name__})")
