"""Tokenizer loading, prompt encoding and chat-template rendering: one place for the engine and serving."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pagedllm.errors import FieldError
from pagedllm.tool_format import ToolUse, chat_for_model, renders_tools


def load_tokenizer(model_path: Path) -> Any:
    """AutoTokenizer's choice of tokenizer, given config.json as read: of a config it reads only model_type,
    tokenizer_class and the path, and left to load the config itself it imports the architecture's config class,
    0.8 s of modules (transformers 5.25) in every process that starts."""
    # here: transformers brings torch, which a Triton stub loads late
    from transformers import AutoTokenizer, PreTrainedConfig
    config_json = Path(model_path) / "config.json"
    if not config_json.is_file():
        return AutoTokenizer.from_pretrained(model_path)
    config = PreTrainedConfig(**json.loads(config_json.read_text()))
    config._name_or_path = str(model_path)
    return AutoTokenizer.from_pretrained(model_path, config=config)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The model's chat template applied, ready for the assistant's turn; errors name `messages`."""
    if not getattr(tokenizer, "chat_template", None):
        raise FieldError("messages", "this model has no chat template; send text_input instead")
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises on templates' own checks (role order, ...)
        raise FieldError("messages", f"the chat template rejected them ({e})") from None


def tools_reach_the_model_by(tokenizer: Any) -> str:
    """How a chat's tools are shown to this model, for its load-time log line."""
    return ("its own chat template" if renders_tools(getattr(tokenizer, "chat_template", None))
            else "the Hermes-style fallback (a system message; see docs/ARCHITECTURE.md)")


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]],
                tool_use: ToolUse | None = None) -> tuple[str, list[int]]:
    """The rendered chat and its token ids, where a message's content is only ever text: a special token
    written in it (`<|im_start|>system` in a user's message) is encoded as the characters it spells, never
    as the marker the template uses. The ids are those of the whole rendering when no content holds one.
    Messages may hold tool calls and results, shown to the model as tool_format.py says."""
    messages, tools = chat_for_model(messages, tool_use, renders_tools(getattr(tokenizer, "chat_template", None)))
    specials = [t for t in tokenizer.all_special_tokens if t]
    if tools is not None or any(m.get("tool_calls") for m in messages):  # rendered by the template itself
        spelled = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
        token = next((t for t in specials if t in spelled), None)
        if token is not None:
            raise FieldError("tools", f"a tool or an earlier call holds {token!r}, this model's special token; "
                             "remove it")
    text = render_chat(tokenizer, messages, tools)
    held = next(((i, t) for i, m in enumerate(messages) for t in specials if t in str(m.get("content") or "")), None)
    if held is None:
        return text, encode_text(tokenizer, text, add_special_tokens=False)
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters, in no template
    contents = {mark: m["content"] for m, mark in zip(messages, marks) if isinstance(m.get("content"), str)}
    marked = render_chat(tokenizer, [{**m, "content": mark} if mark in contents else m
                                     for m, mark in zip(messages, marks)], tools)
    parts = re.split("(\ue000\\d+\ue001)", marked)
    if "".join(contents.get(p, p) for p in parts) != text:  # the template rewrites contents (trims them, ...)
        raise FieldError(f"messages[{held[0]}].content", f"holds {held[1]!r}, this model's special token, which its "
                         "chat template cannot keep apart from its own markup; remove it")
    ids = []
    for part in parts:
        if part in contents:
            ids += tokenizer.encode(contents[part], add_special_tokens=False, split_special_tokens=True)
        elif part:
            ids += tokenizer.encode(part, add_special_tokens=False)
    return text, ids
