"""Streaming text: deltas concatenate to the final text, never split a UTF-8 character, and stop strings
are matched across token boundaries."""
from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pagedllm.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world! The café serves crème brûlée.",
    "Emoji: 🚀🔥 and family 👨‍👩‍👧 done.",
    "中文测试：你好，世界。日本語も少し。",
    "  leading spaces, tabs\tand\nnewlines  ",
    "mixed 한국어 ✓ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end",
]


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    """A SentencePiece-style (Llama 2) tokenizer: Metaspace, byte fallback, leading-space strip."""
    letters = list("▁abcdefghijklmnopqrstuvwxyz")
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("l", "l"), ("▁", "w"), ("o", "r"), ("▁w", "or")]
    vocab = {"<s>": 0, "</s>": 1, **{f"<0x{i:02X}>": 2 + i for i in range(256)}}
    for token in letters + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _stream(tokenizer, ids, stop=(), include_stop=False, prompt=(1,)):
    detok = IncrementalDetokenizer(tokenizer, list(prompt), list(stop), include_stop=include_stop)
    deltas = []
    for i, token in enumerate(ids):
        stopped = detok.add_token(token)
        deltas.append(detok.take_delta(finished=stopped or i == len(ids) - 1))
        if stopped:
            break
    return deltas, detok


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == detok.output_text == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_stream_equals_decode(byte_fallback_tokenizer, text):
    tok = byte_fallback_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    deltas, _ = _stream(tok, ids, prompt=tok.encode("hello", add_special_tokens=False))
    assert all("\ufffd" not in d for d in deltas)
    # Mid-text, a SentencePiece stream keeps the space a standalone decode of the output would strip.
    assert "".join(deltas).lstrip(" ") == tok.decode(ids).lstrip(" ")


def test_partial_character_is_never_emitted(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # the rocket spans several byte-level tokens
    deltas, detok = _stream(tokenizer, ids[:-1])
    assert deltas == [""] * (len(ids) - 1) and detok.output_text == ""


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tokenizer, include):
    text = "The answer is forty-two. END of story, more text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tokenizer, ids, stop=["wo. EN", "never"], include_stop=include)
    expected = "The answer is forty-two. EN" if include else "The answer is forty-t"
    assert "".join(deltas) == detok.output_text == expected


def test_a_tokenizer_that_cleans_up_spaces_streams_what_its_decode_returns(tokenizer):
    """The Rust tokenizer is called directly only where transformers' decode adds nothing to it (the embedded
    model's, above); one that may clean up spaces before punctuation streams through its own decode."""
    assert not tokenizer.clean_up_tokenization_spaces
    cleaning = copy.deepcopy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    ids = cleaning.encode("Hello , world . It is n't", add_special_tokens=False)
    deltas, detok = _stream(cleaning, ids)
    assert "".join(deltas) == cleaning.decode(ids) and detok._decoder is cleaning


@pytest.mark.parametrize("every", [2, 3, 1000])
def test_text_asked_for_every_few_tokens_is_the_text_streamed_token_by_token(tokenizer, byte_fallback_tokenizer,
                                                                             every):
    """Without stop strings, tokens are decoded only when their text is asked for, each as if alone."""
    for tok in (tokenizer, byte_fallback_tokenizer):
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            streamed, _ = _stream(tok, ids, prompt=tok.encode("hello", add_special_tokens=False))
            detok = IncrementalDetokenizer(tok, tok.encode("hello", add_special_tokens=False), [])
            deltas = []
            for i, token in enumerate(ids):
                assert detok.add_token(token) is False
                if (i + 1) % every == 0:
                    deltas.append(detok.take_delta(finished=False))
            assert detok.decoded < len(detok.ids) or len(ids) % every == 0  # the rest waits to be asked for
            assert "".join(deltas) + detok.take_delta(finished=True) == detok.output_text == "".join(streamed)
