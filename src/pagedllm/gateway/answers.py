"""OpenAI's response objects, built from what the engine streams back: the whole answer, its streamed
chunks, usage and logprobs, for chat and for completions."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedllm.gateway.protocol import Plan
from pagedllm.gateway.structured import tool_calls

OBJECTS = {"chat": ("chatcmpl-", "chat.completion", "chat.completion.chunk"),
           "completion": ("cmpl-", "text_completion", "text_completion")}


@dataclass
class ChoiceOutput:
    """What one choice has produced so far."""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # the engine's steps


@dataclass
class Answer:
    """One response under construction: its id and creation time, shared by every chunk."""
    plan: Plan
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    outputs: list[ChoiceOutput] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.id = self.id or OBJECTS[self.plan.kind][0] + uuid.uuid4().hex
        self.outputs = self.outputs or [ChoiceOutput() for _ in self.plan.choices]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.plan.model}

    def usage(self) -> dict[str, int]:
        """Each prompt counts once however many choices it has, as OpenAI counts it."""
        prompt = sum(out.prompt_tokens for out in self.outputs[::self.plan.n])
        completion = sum(out.completion_tokens for out in self.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict[str, Any]:
        choices = [self._choice(i, out) for i, out in enumerate(self.outputs)]
        return self._head(OBJECTS[self.plan.kind][1]) | {"choices": choices, "usage": self.usage()}

    def _choice(self, index: int, out: ChoiceOutput) -> dict[str, Any]:
        text = self._echo(index) + out.text
        if self._is_tool_call(out):
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls(self.plan.tool_call, out.text)}
            return {"index": index, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        if self.plan.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": self._logprobs(out.logprobs, 0), "finish_reason": out.finish_reason}
        return {"index": index, "text": text, "logprobs": self._logprobs(out.logprobs, 0),
                "finish_reason": out.finish_reason}

    def _echo(self, index: int) -> str:
        return self.plan.choices[index].prompt or "" if self.plan.echo else ""

    def _is_tool_call(self, out: ChoiceOutput) -> bool:
        """A tool call ends with its grammar complete; cut short at max_tokens it is answered as text."""
        return self.plan.tool_call is not None and out.finish_reason == "stop"

    def chunk(self, index: int, text: str, steps: list[dict[str, Any]], finish_reason: str | None,
              first: bool = False) -> dict[str, Any] | None:
        """One streamed chunk of choice `index`. A chat stream's first chunk carries the role; a completion
        stream's first chunk carries the echoed prompt. A tool call's text is held back and sent whole in its
        last chunk; None while there is nothing to send."""
        out = self.outputs[index]
        if self.plan.tool_call is not None and not first:
            return self._tool_chunk(index, out) if finish_reason else None
        logprobs = self._logprobs(steps, len(out.text) - len(text))
        if self.plan.kind == "chat":
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            echo = self._echo(index) if first else ""
            choice = {"index": index, "text": echo + text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._chunk_head() | {"choices": [choice]}

    def _tool_chunk(self, index: int, out: ChoiceOutput) -> dict[str, Any]:
        if self._is_tool_call(out):
            calls = [{"index": i} | call for i, call in enumerate(tool_calls(self.plan.tool_call, out.text))]
            delta, reason = {"tool_calls": calls}, "tool_calls"
        else:
            delta, reason = {"content": out.text}, out.finish_reason
        return self._chunk_head() | {"choices": [{"index": index, "delta": delta, "logprobs": None,
                                                  "finish_reason": reason}]}

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat: each choice's role. Completions with echo: each choice's prompt."""
        if self.plan.kind == "completion" and not self.plan.echo:
            return []
        return [self.chunk(i, "", [], None, first=True) for i in range(len(self.outputs))]

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
