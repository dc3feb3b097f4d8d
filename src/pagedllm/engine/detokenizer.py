"""Incremental detokenization: text deltas whose concatenation is the final text, never a partial
UTF-8 character, and stop strings matched on text across token boundaries and cut from the output. Without stop
strings a token is decoded only once its text is asked for, each in turn as if it had come alone."""
from __future__ import annotations

from typing import Any

# Tokens of context decoded before the new ones, so tokenizers that drop a leading space
# at the start of a decode (SentencePiece) still place spaces right.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str],
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        # A fast tokenizer that cleans up no spaces decodes as its Rust tokenizer does; called directly, without
        # transformers' wrapper around it (15-20 us a call, two calls a token).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
        self._decoder = backend if plain else tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop, self.include_stop = stop, include_stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.decoded = len(self.ids)  # ids[:decoded] have been through _decode_next
        self.text = ""  # decoded so far, including text held back for stop matching
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    @property
    def output_text(self) -> str:
        return self.text[:self.emitted]

    def add_token(self, token_id: int) -> bool:
        """Take one more token; returns True when a stop string has just matched. Only stop strings need its text
        now: without them it waits until a delta is built, and a run of tokens decodes with the decoder's code warm
        (each step's first decode cost 25-30 us, the weights' pass having pushed it out of the caches; Xeon, batch-1
        decode of LLM.generate: 148 against 194 us of Python a step, and 480 against 530 at 32 rows streamed every
        4 tokens)."""
        self.ids.append(token_id)
        return bool(self.stop) and self._decode_pending()

    def take_delta(self, finished: bool) -> str:
        """Text that is now safe to emit; on finish, everything that remains."""
        self._decode_pending()
        end = len(self.text) if finished or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        delta, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return delta

    def _decode_pending(self) -> bool:
        """Decode the tokens taken since the last call, one at a time; True when a stop string matched."""
        while self.decoded < len(self.ids) and not self.stopped:
            self.decoded += 1
            if self._decode_next():
                return True
        return False

    def _decode_next(self) -> bool:
        """Decode through ids[:decoded]; True when a stop string has just matched."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:self.decoded])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return False  # nothing new, or an incomplete UTF-8 sequence: wait for more tokens
        searched_from = max(0, len(self.text) - self.holdback)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, self.decoded
        return self._match_stop(searched_from)

    def _match_stop(self, start: int) -> bool:
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:index + (len(stop) if self.include_stop else 0)]
        self.stopped = True
        return True

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self.skip_special_tokens)
