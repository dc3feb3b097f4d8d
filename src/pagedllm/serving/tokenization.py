"""Turning a parsed request into prompt token ids (and the prompt text echoed back to clients)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.engine.tokenizer import encode_chat, encode_text
from pagedllm.errors import InvalidRequestError
from pagedllm.serving.request import MAX_PROMPT_BYTES, GenerateRequest
from pagedllm.tool_format import chat_bytes


@dataclass(frozen=True)
class PromptLimit:
    """The longest prompt a model takes, in tokens, and a bound on the text bytes that can encode to no more:
    no token covers more than the vocabulary's longest entry, so text over max_tokens times that many bytes is
    refused before it is tokenized (twice that, for normalizers that drop characters)."""
    max_tokens: int
    max_bytes: int = MAX_PROMPT_BYTES

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_tokens: int) -> PromptLimit:
        longest = max(len(token.encode("utf-8")) for token in tokenizer.get_vocab())
        return cls(max_tokens, min(MAX_PROMPT_BYTES, 2 * max_tokens * longest))

    def check_text(self, req: GenerateRequest) -> None:
        if req.messages is not None:
            name, size = "messages", chat_bytes(req.messages, req.tools)
        else:
            name, size = "text_input", len((req.text or "").encode("utf-8"))
        if size > self.max_bytes:
            raise InvalidRequestError(name, f"{size} bytes of text is more than the model's max_model_len "
                                      f"{self.max_tokens} tokens can hold; send at most {self.max_bytes} bytes")


def tokenize_request(tokenizer: Any, req: GenerateRequest, limit: PromptLimit | None = None) -> list[int]:
    """Fill `req.input_ids` (and the echo text for chats) from text or messages; return the ids. With a
    `limit`, text too long for it is refused before tokenizing."""
    if req.input_ids is None:
        if limit is not None:
            limit.check_text(req)
        if req.messages is not None:  # a chat the template refuses is a FieldError naming messages or tools
            req.options.prompt_text, req.input_ids = encode_chat(tokenizer, req.messages, req.tools)
        else:
            req.input_ids = encode_text(tokenizer, req.text or "")
    if not req.input_ids:
        raise InvalidRequestError("text_input", "encodes to no tokens")
    return req.input_ids
