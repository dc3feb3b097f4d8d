"""Tool calling in OpenAI's chat API: which functions a request lets the model call and how, the constraint
that keeps its calls valid, and the calls read out of its output as it streams. The call format, and how
tools reach the model, are tool_format.py's.

The answer is constrained by an xgrammar structural tag: under "auto" free text, then optionally calls
(separated by a newline) and nothing after them; under "required" or a named function, calls only. Once the
model writes `<tool_call>`, the name must be one of the tools and the arguments must match its schema. The
arguments are passed on as the model wrote them, so the streamed pieces add up to the whole answer's
arguments byte for byte."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.tool_format import (
    CALL_END,
    CALL_SEPARATOR,
    CALL_START,
    HEAD_ARGUMENTS,
    HEAD_NAME,
    ToolUse,
    call_head,
    parameters,
)

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_NAME = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Function(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


@dataclass
class ToolCallPlan:
    """The functions the model may call, and how: "auto" (text or calls, the model decides), "required" (at
    least one call) or "named" (a call of the one function); `parallel`: more than one call per answer;
    `legacy`: the request used `functions` / `function_call`, and is answered in that shape."""
    functions: list[Function]
    mode: Literal["auto", "required", "named"]
    parallel: bool = True
    legacy: bool = False

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def tool_use(self) -> ToolUse:
        """What the engine's chat rendering needs: the functions, the mode and `parallel`."""
        return ToolUse(tuple(f.model_dump(exclude_none=True) for f in self.functions), self.mode, self.parallel)


def plan_tools(tools: list[Tool] | None, tool_choice: str | dict[str, Any] | None, parallel: bool | None,
               functions: list[Function] | None = None,
               function_call: str | dict[str, Any] | None = None) -> ToolCallPlan | None:
    """The plan for a request's tool fields (or the legacy function fields), or InvalidRequestError naming
    the field. None: no tools, or tool_choice "none"."""
    legacy = functions is not None or function_call is not None
    if legacy and (tools is not None or tool_choice is not None):
        raise InvalidRequestError("functions: send tools and tool_choice, or the legacy functions and "
                                  "function_call, not both", "functions")
    if legacy:
        field, given = "function_call", [Tool(type="function", function=f) for f in functions or []]
        choice = ({"type": "function", "function": function_call} if isinstance(function_call, dict)
                  else function_call)
        tools, tool_choice, parallel = given or None, choice, False
    else:
        field = "tool_choice"
    if tool_choice == "none" or (not tools and tool_choice is None):
        return None
    if not tools:
        raise InvalidRequestError(f"{field}: needs {'functions' if legacy else 'tools'}", field)
    by_name = {tool.function.name: tool.function for tool in tools}
    if len(by_name) < len(tools):
        raise InvalidRequestError("tools: two functions have the same name", "functions" if legacy else "tools")
    parallel = True if parallel is None else parallel
    if tool_choice is None or tool_choice == "auto" or (tool_choice == "required" and not legacy):
        return ToolCallPlan(list(by_name.values()), tool_choice or "auto", parallel, legacy)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or name not in by_name:
        expected = (f"{{'name': one of {sorted(by_name)}}}" if legacy else
                    f"{{'type': 'function', 'function': {{'name': one of {sorted(by_name)}}}}}")
        raise InvalidRequestError(f"{field}: expected 'none', 'auto'{'' if legacy else ', required'} or "
                                  f"{expected}", field)
    return ToolCallPlan([by_name[name]], "named", False, legacy)


def constraint(plan: ToolCallPlan) -> dict[str, Any]:
    """The engine's structured_outputs for the plan: an xgrammar structural tag."""
    tags = [{"type": "tag", "begin": call_head(f["name"]), "end": CALL_END,
             "content": {"type": "json_schema", "json_schema": parameters(f)}} for f in plan.tool_use().functions]
    calls = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR,
             "at_least_one": True, "stop_after_first": not plan.parallel}
    if plan.mode == "auto":
        text = {"type": "any_text", "excludes": [CALL_START]}
        fmt = {"type": "sequence", "elements": [text, {"type": "optional", "content": calls}]}
    else:
        fmt = calls
    return {"structural_tag": json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)}


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class Piece:
    """What one step of the output added: content text, the start of call `index` (`name` set), or a piece
    of its arguments."""
    kind: Literal["content", "call", "arguments"]
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass
class ToolCallParser:
    """Reads the constrained output as it streams: content before the first call, then calls. Text is held
    back only while it may be the start of `<tool_call>` or of a call's end. Text after a call that is not a
    call is dropped (the grammar allows none; an answer cut short may leave some)."""
    calls: list[ToolCall] = field(default_factory=list)
    content: str = ""
    _buffer: str = ""
    _state: Literal["text", "head", "arguments", "after"] = "text"
    _blank: str = ""  # leading whitespace of the content, sent only once something else follows

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        pieces: list[Piece] = []
        while self._step(pieces):
            pass
        return pieces

    def finish(self) -> list[Piece]:
        """The text held back, once the output is complete (or cut short)."""
        pieces: list[Piece] = []
        rest, self._buffer = self._buffer, ""
        if self._state == "arguments" and rest:
            pieces.append(self._arguments(rest))
        elif self._state in ("text", "head") and not self.calls:
            self._text(self._blank + rest if not self.content else rest, pieces, final=True)
        return pieces

    def _step(self, pieces: list[Piece]) -> bool:
        if self._state in ("text", "after"):
            at = self._buffer.find(CALL_START)
            cut = at if at >= 0 else len(self._buffer) - _partial_suffix(self._buffer, CALL_START)
            if self._state == "text":
                self._text(self._buffer[:cut], pieces)
            self._buffer = self._buffer[cut:]
            if at < 0:
                return False
            self._state = "head"
        if self._state == "head":
            head = _read_head(self._buffer)
            if head is None:
                return False
            if head is False:  # not a call after all: its first character is text, and the search goes on
                if not self.calls:
                    self._text(self._buffer[0], pieces)
                self._buffer, self._state = self._buffer[1:], "text" if not self.calls else "after"
                return True
            name, length = head
            call = ToolCall(len(self.calls), "call_" + uuid.uuid4().hex[:24], name)
            self.calls.append(call)
            pieces.append(Piece("call", index=call.index, id=call.id, name=name))
            self._buffer, self._state = self._buffer[length:], "arguments"
        at = self._buffer.find(CALL_END)
        cut = at if at >= 0 else len(self._buffer) - _partial_suffix(self._buffer, CALL_END)
        if cut:
            pieces.append(self._arguments(self._buffer[:cut]))
        self._buffer = self._buffer[cut:]
        if at < 0:
            return False
        self._buffer, self._state = self._buffer[len(CALL_END):], "after"
        return True

    def _text(self, text: str, pieces: list[Piece], final: bool = False) -> None:
        if not self.content and not final:  # whitespace alone before a call is not content
            self._blank += text
            if not self._blank.strip():
                return
            text, self._blank = self._blank, ""
        if text:
            self.content += text
            pieces.append(Piece("content", text))

    def _arguments(self, text: str) -> Piece:
        call = self.calls[-1]
        call.arguments += text
        return Piece("arguments", text, call.index)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (and is not all of it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _read_head(text: str) -> tuple[str, int] | None | Literal[False]:
    """A call's head at the start of `text`: (name, length); None while it may still become one; False if
    it cannot."""
    fixed = min(len(text), len(HEAD_NAME))
    if text[:fixed] != HEAD_NAME[:fixed]:
        return False
    if len(text) <= len(HEAD_NAME):
        return None
    end = len(HEAD_NAME)
    while end < len(text) and text[end] in _NAME_CHARS and end - len(HEAD_NAME) < MAX_NAME:
        end += 1
    name = text[len(HEAD_NAME):end]
    rest = text[end:end + len(HEAD_ARGUMENTS)]
    if not HEAD_ARGUMENTS.startswith(rest) or (end < len(text) and not name):
        return False
    if len(rest) < len(HEAD_ARGUMENTS):
        return None
    return name, end + len(HEAD_ARGUMENTS)
