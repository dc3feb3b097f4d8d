"""Turning a parsed request into prompt token ids (and the prompt text echoed back to clients)."""
from __future__ import annotations

from typing import Any

from pagedllm.engine.tokenizer import encode_chat, encode_text
from pagedllm.errors import InvalidRequestError
from pagedllm.serving.request import GenerateRequest


def tokenize_request(tokenizer: Any, req: GenerateRequest) -> list[int]:
    """Fill `req.input_ids` (and the echo text for chats) from text or messages; return the ids."""
    if req.input_ids is None:
        try:
            if req.messages is not None:
                req.options.prompt_text, req.input_ids = encode_chat(tokenizer, req.messages)
            else:
                req.input_ids = encode_text(tokenizer, req.text or "")
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
    if not req.input_ids:
        raise InvalidRequestError("text_input: encodes to no tokens")
    return req.input_ids
