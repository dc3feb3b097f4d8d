"""OpenAI's Responses API (`POST /v1/responses`) on the chat machinery: a request's instructions and input
items become chat messages and its function tools the chat tools (protocol.py, tools.py validate them as
for chat); the chat answer is reshaped into output items (a message, function calls) and, streamed, into
the API's typed events. Responses are kept for `previous_response_id` in a bounded store per gateway."""
from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pagedllm.gateway.answers import Answer
from pagedllm.gateway.errors import InvalidRequestError
from pagedllm.gateway.protocol import MAX_TOOLS, field_error_of, parse
from pagedllm.gateway.tools import Piece

UNSUPPORTED = {"reasoning": "reasoning settings", "background": "background responses", "conversation":
               "conversations", "prompt": "stored prompts", "top_logprobs": "logprobs",
               "max_tool_calls": "max_tool_calls"}
# Request fields that reach the chat request under another name, for the errors that name them.
CHAT_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format", "messages": "input"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class FunctionTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class TextFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one a model without the setting honours


class ResponsesRequest(_Body):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None  # OpenAI's default: true
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    include: list[str] | None = Field(None, max_length=0)  # nothing extra to include
    truncation: Literal["disabled"] | None = None


class _Message(_Body):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    id: str | None = None
    status: str | None = None


class _FunctionCall(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class _FunctionCallOutput(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]
    id: str | None = None
    status: str | None = None


ITEMS = {"message": _Message, "function_call": _FunctionCall, "function_call_output": _FunctionCallOutput}


@dataclass
class Stored:
    key: str
    messages: list[dict[str, Any]]  # the conversation, in chat messages, answer included
    expires: float


class ResponseStore:
    """The last `size` responses, each for `seconds`, readable only with the key that made it (GatewayConfig's
    responses_stored and responses_kept_seconds)."""

    def __init__(self, size: int, seconds: float, clock=time.monotonic) -> None:
        self.size, self.seconds, self.clock = size, seconds, clock
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response_id: str, key: str, messages: list[dict[str, Any]]) -> None:
        self._items[response_id] = Stored(key, messages, self.clock() + self.seconds)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, response_id: str, key: str) -> list[dict[str, Any]]:
        stored = self._items.get(response_id)
        if stored is None or stored.key != key or stored.expires < self.clock():
            raise InvalidRequestError(f"previous_response_id: no response {response_id!r} is stored here (responses "
                                      f"are kept for {self.seconds:g} s, the last {self.size}, and only for the key "
                                      "that made them)", "previous_response_id", "previous_response_not_found")
        return stored.messages


def parse_request(body: Any, store: ResponseStore, key: str) -> ResponseAnswer:
    """The answer under construction for a decoded body, or InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", None)
    for name in body:
        if name in UNSUPPORTED:
            raise InvalidRequestError(f"{name}: {UNSUPPORTED[name]} are not supported by this server", name)
    try:
        request = ResponsesRequest.model_validate(body)
    except ValidationError as e:
        raise field_error_of(e) from None
    history = store.get(request.previous_response_id, key) if request.previous_response_id else []
    conversation = history + _messages(request.input)
    chat: dict[str, Any] = {"model": request.model, "messages": conversation, "stream": request.stream}
    if request.instructions:
        chat["messages"] = [{"role": "system", "content": request.instructions}] + conversation
    for name in ("temperature", "top_p", "tool_choice", "parallel_tool_calls", "user"):
        if getattr(request, name) is not None:
            chat[name] = _chat_tool_choice(request.tool_choice) if name == "tool_choice" else getattr(request, name)
    if request.max_output_tokens is not None:
        chat["max_completion_tokens"] = request.max_output_tokens
    if request.tools:
        chat["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in request.tools]
    fmt = request.text.format if request.text else None
    if fmt is not None and fmt.type != "text":
        chat["response_format"] = {"type": fmt.type} | ({"json_schema": {
            "name": fmt.name or "output", "schema": fmt.json_schema} | ({"strict": fmt.strict} if fmt.strict is not None
                                                                      else {})} if fmt.type == "json_schema" else {})
    try:
        plan = parse("chat", chat)
    except InvalidRequestError as e:
        raise _renamed(e) from None
    plan.renamed = {k: CHAT_NAMES.get(v, v) for k, v in plan.renamed.items()}
    return ResponseAnswer(plan, request=request, conversation=conversation, key=key, store=store)


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    """The Responses API names a function at the top level: {"type": "function", "name": ...}."""
    if isinstance(choice, dict) and choice.get("type") == "function" and set(choice) == {"type", "name"}:
        return {"type": "function", "function": {"name": choice["name"]}}
    if isinstance(choice, dict):
        raise InvalidRequestError("tool_choice: expected 'none', 'auto', 'required' or {'type': 'function', "
                                  "'name': ...}", "tool_choice")
    return choice


def _renamed(error: InvalidRequestError) -> InvalidRequestError:
    param = error.param or ""
    for chat_name, name in CHAT_NAMES.items():
        if param == chat_name or param.startswith(chat_name + ".") or param.startswith(chat_name + "["):
            if chat_name == "messages":  # the index is a message's, not an input item's
                return InvalidRequestError(error.message.replace(param.split(".")[0], "input", 1), "input",
                                           error.code)
            new = name + param[len(chat_name):]
            return InvalidRequestError(error.message.replace(param, new, 1), new, error.code)
    return error


def _messages(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls are one assistant message's tool calls."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise InvalidRequestError("input: must be a non-empty string or list of items", "input")
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(given):
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        if kind not in ITEMS:
            raise InvalidRequestError(f"input[{i}].type: expected one of {sorted(ITEMS)}, got {kind!r}",
                                      f"input[{i}].type")
        try:
            item = ITEMS[kind].model_validate(raw)
        except ValidationError as e:
            raise field_error_of(e, f"input[{i}]") from None
        if isinstance(item, _Message):
            messages.append({"role": item.role, "content": _text(item.content, f"input[{i}].content")})
        elif isinstance(item, _FunctionCall):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last and last["role"] == "assistant" and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": _text(item.output, f"input[{i}].output")})
    return messages


def _text(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.get("type") not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{where}[{j}]: only input_text and output_text parts are supported, got type "
                                      f"{part.get('type')!r}", f"{where}[{j}]")
    return "".join(part["text"] for part in content)


@dataclass
class _Item:
    """An output item being streamed: a message, or a function call."""
    body: dict[str, Any]
    text: str = ""


@dataclass
class ResponseAnswer(Answer):
    """A response: the chat answer of choice 0 as output items, whole or as the API's events."""
    request: ResponsesRequest | None = None
    conversation: list[dict[str, Any]] = field(default_factory=list)
    key: str = "-"
    store: ResponseStore | None = None
    _items: list[_Item] = field(default_factory=list)
    _sequence: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.id = "resp_" + uuid.uuid4().hex

    def whole(self) -> dict[str, Any]:
        """The response, once every chunk has been folded in (by chunks(), streamed or not)."""
        return self._response(final=True)

    def chunks(self, index: int, text: str, steps: list[dict[str, Any]], finish_reason: str | None,
               first: bool = False) -> list[dict[str, Any]]:
        if self.plan.tool_call is None:
            pieces = [Piece("content", text)] if text else []
        else:
            parser = self.parsers[index]
            pieces = parser.feed(text) + (parser.finish() if finish_reason else [])
        events = [e for piece in pieces for e in self._apply(piece)]
        if finish_reason:
            events += self._close() + [self._event("response.incomplete" if self._incomplete()
                                                   else "response.completed", response=self._response(final=True))]
        return events

    def opening_chunks(self) -> list[dict[str, Any]]:
        response = self._response(final=False)
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def closing_chunks(self) -> list[dict[str, Any] | str]:
        return []

    def encode(self, event: dict[str, Any] | str) -> bytes:
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        return f"event: {event['type']}\ndata: {data}\n\n".encode()

    def error_event(self, body: dict[str, Any]) -> dict[str, Any]:
        error = body["error"]
        return self._event("error", code=error.get("code"), message=error["message"], param=error.get("param"))

    # ---- items ---------------------------------------------------------------------------------
    def _apply(self, piece: Piece) -> list[dict[str, Any]]:
        """Fold one piece of output into the items; the events that say so."""
        open_item = self._items[-1] if self._items and self._items[-1].body["status"] == "in_progress" else None
        if piece.kind == "content":
            events = []
            if open_item is None or open_item.body["type"] != "message":
                events += self._close()
                item = self._add({"id": "msg_" + uuid.uuid4().hex, "type": "message", "status": "in_progress",
                                  "role": "assistant", "content": []})
                events += [self._event("response.output_item.added", output_index=len(self._items) - 1,
                                       item=item.body),
                           self._event("response.content_part.added", **self._at(item), content_index=0,
                                       part=_text_part(""))]
                open_item = item
            open_item.text += piece.text
            return events + [self._event("response.output_text.delta", **self._at(open_item), content_index=0,
                                         delta=piece.text, logprobs=[])]
        if piece.kind == "call":
            events = self._close()
            item = self._add({"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "status": "in_progress",
                              "call_id": piece.id, "name": piece.name, "arguments": ""})
            return events + [self._event("response.output_item.added", output_index=len(self._items) - 1,
                                         item=dict(item.body))]
        open_item.text += piece.text
        return [self._event("response.function_call_arguments.delta", **self._at(open_item), delta=piece.text)]

    def _add(self, body: dict[str, Any]) -> _Item:
        self._items.append(_Item(body))
        return self._items[-1]

    def _close(self) -> list[dict[str, Any]]:
        """The open item finished: its done events."""
        if not self._items or self._items[-1].body["status"] != "in_progress":
            return []
        item = self._items[-1]
        item.body["status"] = "incomplete" if self._incomplete() else "completed"
        if item.body["type"] == "message":
            item.body["content"] = [_text_part(item.text)]
            events = [self._event("response.output_text.done", **self._at(item), content_index=0, text=item.text,
                                  logprobs=[]),
                      self._event("response.content_part.done", **self._at(item), content_index=0,
                                  part=_text_part(item.text))]
        else:
            item.body["arguments"] = item.text
            events = [self._event("response.function_call_arguments.done", **self._at(item), name=item.body["name"],
                                  arguments=item.text)]
        return events + [self._event("response.output_item.done", output_index=self._items.index(item),
                                     item=item.body)]

    def _at(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.body["id"], "output_index": self._items.index(item)}

    def _incomplete(self) -> bool:
        return self.outputs[0].finish_reason == "length"

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self._sequence += 1
        return {"type": kind, "sequence_number": self._sequence - 1, **fields}

    def _response(self, final: bool) -> dict[str, Any]:
        request = self.request
        if final:
            self._close()
        status = ("incomplete" if self._incomplete() else "completed") if final else "in_progress"
        usage = self.usage()
        response = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": request.model, "output": [item.body for item in self._items] if final else [],
            "instructions": request.instructions,
            "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
            "tool_choice": request.tool_choice or "auto",
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "temperature": request.temperature, "top_p": request.top_p, "max_output_tokens": request.max_output_tokens,
            "previous_response_id": request.previous_response_id, "store": request.store is not False,
            "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)
                     if request.text and request.text.format else {"type": "text"}},
            "metadata": request.metadata or {}, "error": None, "user": request.user,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self._incomplete() else None,
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"],
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}} if final else None}
        if final and request.store is not False and self.store is not None:
            self.store.put(self.id, self.key, self.conversation + [self._as_message()])
        return response

    def _as_message(self) -> dict[str, Any]:
        """The output as the chat message a later turn sends back."""
        text = "".join(item.text for item in self._items if item.body["type"] == "message")
        calls = [{"id": item.body["call_id"], "type": "function",
                  "function": {"name": item.body["name"], "arguments": item.text}}
                 for item in self._items if item.body["type"] == "function_call"]
        return {"role": "assistant", "content": text or None} | ({"tool_calls": calls} if calls else {})


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

