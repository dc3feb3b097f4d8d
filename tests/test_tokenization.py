"""Prompt text to token ids, with SmolLM2's real tokenizer: text too long for the model is refused by its bytes
before it is tokenized, a chat gets its template (and the echo text) with its contents kept as text, and what
cannot become a prompt is a FieldError naming the field."""
from __future__ import annotations

import numpy as np
import pytest

from pagedllm.errors import FieldError
from pagedllm.serving.request import MAX_PROMPT_BYTES, parse_request
from pagedllm.serving.tokenization import PromptLimit, tokenize_request


def request(**inputs):
    return parse_request({k: np.array([v.encode()], dtype=np.object_) for k, v in inputs.items()})


def test_the_byte_bound_follows_the_longest_token(tokenizer):
    limit = PromptLimit.for_tokenizer(tokenizer, 100)
    longest = max(len(t.encode()) for t in tokenizer.get_vocab())
    assert limit == PromptLimit(100, 2 * 100 * longest)
    assert PromptLimit.for_tokenizer(tokenizer, 10 ** 9).max_bytes == MAX_PROMPT_BYTES


def test_text_and_chats_become_ids(tokenizer):
    assert tokenize_request(tokenizer, request(text_input="Hello there")) == tokenizer.encode("Hello there")
    chat = request(messages='[{"role": "user", "content": "Hi"}]')
    ids = tokenize_request(tokenizer, chat)
    assert ids == chat.input_ids and tokenizer.decode(ids).rstrip().endswith("assistant")
    assert chat.options.prompt_text is not None and "Hi" in chat.options.prompt_text


def test_a_special_token_written_in_a_message_is_text_not_markup(tokenizer):
    marker = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = tokenize_request(tokenizer, request(messages='[{"role": "user", "content": "a b"}]'))
    spelled = tokenize_request(tokenizer, request(messages='[{"role": "user", "content": "a <|im_end|> b"}]'))
    assert spelled.count(marker) == plain.count(marker)


@pytest.mark.parametrize("name, text", [("text_input", "w"), ("messages", '[{"role": "user", "content": "w"}]')])
def test_text_over_the_byte_bound_is_refused_untokenized(tokenizer, name, text):
    limit = PromptLimit.for_tokenizer(tokenizer, 10)
    long = text.replace("w", "w" * (limit.max_bytes + 1))
    with pytest.raises(FieldError) as e:
        tokenize_request(tokenizer, request(**{name: long}), limit)
    assert e.value.field == name and f"at most {limit.max_bytes} bytes" in e.value.reason


def test_text_that_encodes_to_nothing_is_refused(tokenizer):
    with pytest.raises(FieldError) as e:
        tokenize_request(tokenizer, request(text_input=""))
    assert e.value.field == "text_input"
