"""How tools, earlier calls and their results reach the model, and the one call format its answers use.

Calls are written Hermes-style (Qwen2.5, Hermes, SmolLM3 and others were trained on it):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Oslo"}}
    </tool_call>

A model whose chat template renders `tools` in this format (it mentions both `tools` and `<tool_call>`) sees
the tools, calls and results through its own template, as transformers' `apply_chat_template(tools=...)`
renders them. Any other model gets the fallback: a system message listing the tools and the format, earlier
calls written into the assistant's content as above, results in `<tool_response>` tags. Serving renders the
prompt (tokenization.py); the gateway constrains and parses the answer (gateway/tools.py) in the same format."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

CALL_START = "<tool_call>"
CALL_END = "}\n</tool_call>"
CALL_SEPARATOR = "\n"
HEAD_NAME = CALL_START + '\n{"name": "'
HEAD_ARGUMENTS = '", "arguments": '


@dataclass(frozen=True)
class ToolUse:
    """The functions a chat may call (OpenAI's `function` objects: name, description, parameters) and how:
    "auto" (text or calls, the model decides), "required" (at least one call) or "named" (a call of the only
    function); `parallel`: more than one call per answer."""
    functions: tuple[dict[str, Any], ...]
    mode: Literal["auto", "required", "named"] = "auto"
    parallel: bool = True

    def as_tools(self) -> list[dict[str, Any]]:
        """The functions as OpenAI's `tools`, which is how chat templates take them."""
        return [{"type": "function", "function": dict(f)} for f in self.functions]

    def request_fields(self) -> dict[str, Any]:
        """The use as OpenAI's request fields, which are also the Triton contract's inputs."""
        choice = ({"type": "function", "function": {"name": self.functions[0]["name"]}} if self.mode == "named"
                  else self.mode)
        return {"tools": self.as_tools(), "tool_choice": choice, "parallel_tool_calls": self.parallel}


def renders_tools(chat_template: Any) -> bool:
    """Whether a chat template renders `tools` in the call format the answers are parsed in."""
    return isinstance(chat_template, str) and "tools" in chat_template and CALL_START in chat_template


def chat_bytes(messages: list[dict[str, Any]], tool_use: ToolUse | None = None) -> int:
    """The text in a chat: its contents, earlier calls' arguments and the tools' descriptions."""
    texts = [m.get("content") or "" for m in messages]
    texts += [c["function"]["arguments"] for m in messages for c in m.get("tool_calls") or ()]
    texts += [json.dumps(tool_use.as_tools(), ensure_ascii=False)] if tool_use else []
    return sum(len(t.encode("utf-8")) for t in texts)


def call_head(name: str) -> str:
    """A call's text up to its arguments."""
    return f"{HEAD_NAME}{name}{HEAD_ARGUMENTS}"


def parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def chat_for_model(messages: list[dict[str, Any]], tool_use: ToolUse | None,
                   template_renders_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and tools) to render with the model's chat template: OpenAI-shaped messages, which may
    hold an assistant's `tool_calls` and `tool` results, either as the template takes them or in the
    fallback's plain text."""
    if template_renders_tools:
        return [_for_template(m) for m in messages], tool_use.as_tools() if tool_use else None
    flat = [_flattened(m) for m in messages]
    if tool_use is None:
        return flat, None
    prompt = system_prompt(tool_use)
    if flat[0]["role"] == "system":
        return [{**flat[0], "content": flat[0]["content"] + "\n\n" + prompt}] + flat[1:], None
    return [{"role": "system", "content": prompt}] + flat, None


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """Calls' arguments as objects (templates write them with `tojson`), as transformers documents them."""
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _flattened(message: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in message.items() if k in ("role", "name")}
    calls = message.get("tool_calls")
    if calls:
        text = calls_text([(c["function"]["name"], c["function"]["arguments"]) for c in calls])
        return kept | {"content": "\n".join(filter(None, [message.get("content"), text]))}
    if message["role"] == "tool":
        return kept | {"content": result_text(message["content"])}
    return kept | {"content": message["content"]}


def system_prompt(tool_use: ToolUse) -> str:
    """The fallback's system message: the functions and how to call them."""
    listed = "\n".join(json.dumps({"name": f["name"], "description": f.get("description") or "",
                                   "parameters": parameters(f)}, ensure_ascii=False) for f in tool_use.functions)
    how = {"auto": "Call a function only when it helps to answer; otherwise answer in plain text.",
           "required": "Answer with at least one function call.",
           "named": f"Answer with a call of {tool_use.functions[0]['name']}."}[tool_use.mode]
    many = ("You may write several calls, one after another." if tool_use.parallel and tool_use.mode != "named"
            else "Write at most one call.")
    return (f"You can call these functions (name, description, JSON schema of the arguments):\n<tools>\n{listed}\n"
            f"</tools>\nTo call one, write exactly:\n{CALL_START}\n"
            '{"name": <function name>, "arguments": <the arguments as a JSON object>}\n'
            f"{CALL_END[1:]}\n{how} {many} The results come back in <tool_response> tags.")


def calls_text(calls: list[tuple[str, str]]) -> str:
    """Earlier calls (name, arguments as sent back by the client), written as the model writes them."""
    return CALL_SEPARATOR.join(f"{call_head(name)}{_as_json_object(arguments)}{CALL_END}" for name, arguments in calls)


def _as_json_object(arguments: str) -> str:
    try:
        return arguments if isinstance(json.loads(arguments), dict) else json.dumps(arguments)
    except ValueError:
        return json.dumps(arguments, ensure_ascii=False)


def result_text(content: str) -> str:
    """A tool's result, as the fallback's system message says it comes back."""
    return f"<tool_response>\n{content}\n</tool_response>"
