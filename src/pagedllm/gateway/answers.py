"""OpenAI's response objects, built from what the engine streams back: the whole answer, its streamed
chunks, usage and logprobs, for chat and for completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedllm.gateway.protocol import Plan
from pagedllm.gateway.tools import Piece, ToolCallParser
from pagedllm_client import Chunk, Completion

OBJECTS = {"chat": ("chatcmpl-", "chat.completion", "chat.completion.chunk"),
           "completion": ("cmpl-", "text_completion", "text_completion")}


@dataclass
class Answer:
    """One response under construction: its id and creation time, shared by every chunk."""
    plan: Plan
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    outputs: list[Completion] = field(default_factory=list)  # each choice's, folded as the client folds
    parsers: list[ToolCallParser] = field(default_factory=list)  # each choice's calls, as they stream

    def __post_init__(self) -> None:
        self.id = self.id or OBJECTS[self.plan.kind][0] + uuid.uuid4().hex
        self.outputs = self.outputs or [Completion() for _ in self.plan.choices]
        self.parsers = [ToolCallParser() for _ in self.outputs]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model}

    def usage(self) -> dict[str, int]:
        """Each prompt counts once however many choices it has, as OpenAI counts it."""
        prompt = sum(out.num_input_tokens for out in self.outputs[::self.plan.n])
        completion = sum(out.num_output_tokens for out in self.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def add(self, index: int, chunk: Chunk) -> list[dict[str, Any]]:
        """Fold one engine response into choice `index`; the stream chunks it makes, if it says anything."""
        self.outputs[index].add(chunk)
        if not (chunk.text or chunk.logprobs or chunk.finish_reason):
            return []
        return self.chunks(index, chunk.text, chunk.logprobs or [], chunk.finish_reason)

    def whole(self) -> dict[str, Any]:
        choices = [self._choice(i, out) for i, out in enumerate(self.outputs)]
        return self._head(OBJECTS[self.plan.kind][1]) | {"choices": choices, "usage": self.usage()}

    def _choice(self, index: int, out: Completion) -> dict[str, Any]:
        text = self._echo(index) + out.text
        if self.plan.tool_call is not None:
            return self._tool_choice(index, out)
        if self.plan.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(out.logprobs, 0), "finish_reason": out.finish_reason}
        return {"index": index, "text": text, "logprobs": self._logprobs(out.logprobs, 0),
                "finish_reason": out.finish_reason}

    def _echo(self, index: int) -> str:
        return self.plan.choices[index].prompt or "" if self.plan.echo else ""

    def _tool_choice(self, index: int, out: Completion) -> dict[str, Any]:
        parser = ToolCallParser()
        parser.feed(out.text)
        parser.finish()
        message: dict[str, Any] = {"role": "assistant", "content": parser.content or None}
        calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                 for c in parser.calls]
        if self.plan.tool_call.legacy and calls:
            message["function_call"] = calls[0]["function"]
        elif calls:
            message["tool_calls"] = calls
        else:
            message["content"] = parser.content
        return {"index": index, "message": message, "logprobs": None,
                "finish_reason": self._tool_finish(out.finish_reason, bool(calls))}

    def _tool_finish(self, reason: str | None, called: bool) -> str | None:
        if reason != "stop" or not called:
            return reason
        return "function_call" if self.plan.tool_call.legacy else "tool_calls"

    def chunks(self, index: int, text: str, steps: list[dict[str, Any]], finish_reason: str | None,
               first: bool = False) -> list[dict[str, Any]]:
        """The streamed chunks for what choice `index` just added. A chat stream's first chunk carries the
        role; a completion stream's first chunk carries the echoed prompt. With tools: content and calls as
        the parser reads them (a call's name first, then its arguments in pieces)."""
        out = self.outputs[index]
        if self.plan.tool_call is not None and not first:
            return self._tool_chunks(index, text, finish_reason)
        logprobs = self._logprobs(steps, len(out.text) - len(text))
        if self.plan.kind == "chat":
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            echo = self._echo(index) if first else ""
            choice = {"index": index, "text": echo + text, "logprobs": logprobs, "finish_reason": finish_reason}
        return [self._chunk_head() | {"choices": [choice]}]

    def _tool_chunks(self, index: int, text: str, finish_reason: str | None) -> list[dict[str, Any]]:
        parser = self.parsers[index]
        pieces = parser.feed(text) + (parser.finish() if finish_reason else [])
        deltas = [self._delta(piece) for piece in _merged(pieces)]
        if finish_reason:
            deltas.append({})
        reason = self._tool_finish(finish_reason, bool(parser.calls))
        return [self._chunk_head() | {"choices": [{"index": index, "delta": delta, "logprobs": None,
                                                   "finish_reason": reason if i == len(deltas) - 1 else None}]}
                for i, delta in enumerate(deltas)]

    def _delta(self, piece: Piece) -> dict[str, Any]:
        if piece.kind == "content":
            return {"content": piece.text}
        function = {"name": piece.name, "arguments": ""} if piece.kind == "call" else {"arguments": piece.text}
        if self.plan.tool_call.legacy:
            return {"function_call": function}
        call = {"id": piece.id, "type": "function"} if piece.kind == "call" else {}
        return {"tool_calls": [{"index": piece.index} | call | {"function": function}]}

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat: each choice's role. Completions with echo: each choice's prompt."""
        if self.plan.kind == "completion" and not self.plan.echo:
            return []
        return [c for i in range(len(self.outputs)) for c in self.chunks(i, "", [], None, first=True)]

    def closing_chunks(self) -> list[dict[str, Any] | str]:
        """What a stream ends with: the usage, if asked, and the SSE end marker."""
        return ([self.usage_chunk()] if self.plan.include_usage else []) + ["[DONE]"]

    def encode(self, chunk: dict[str, Any] | str) -> bytes:
        return sse(chunk)

    def error_event(self, body: dict[str, Any]) -> dict[str, Any]:
        """An error after the stream began, as its last event."""
        return body

    def usage_chunk(self) -> dict[str, Any]:
        return self._chunk_head() | {"choices": [], "usage": self.usage()}

    def _chunk_head(self) -> dict[str, Any]:
        head = self._head(OBJECTS[self.plan.kind][2])
        return head | {"usage": None} if self.plan.include_usage else head

    def _logprobs(self, steps: list[dict[str, Any]], offset: int) -> dict[str, Any] | None:
        if not self.plan.logprobs:
            return None
        if self.plan.kind == "chat":
            return {"content": [_token(step) | {"top_logprobs": [_token(t) for t in step["top_logprobs"]]}
                                for step in steps]}
        return completion_logprobs(steps, offset)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of content, or of one call's arguments, as one."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if last and piece.kind == last.kind != "call" and piece.index == last.index:
            out[-1] = Piece(last.kind, last.text + piece.text, last.index)
        else:
            out.append(piece)
    return out


def _token(entry: dict[str, Any]) -> dict[str, Any]:
    return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode("utf-8"))}


def completion_logprobs(steps: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, `text_offset` counting characters from `offset`."""
    offsets = []
    for step in steps:
        offsets.append(offset)
        offset += len(step["token"])
    return {"tokens": [s["token"] for s in steps], "token_logprobs": [s["logprob"] for s in steps],
            "top_logprobs": [{t["token"]: t["logprob"] for t in s["top_logprobs"]} for s in steps],
            "text_offset": offsets}


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
