"""Tokenizer loading, prompt encoding and chat-template rendering: one place for the engine and serving."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


def load_tokenizer(model_path: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_path)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def render_chat(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The model's chat template applied, ready for the assistant's turn; errors name `messages`."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model has no chat template; send text_input instead")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises on templates' own checks (role order, ...)
        raise ValueError(f"messages: the chat template rejected them ({e})") from None
