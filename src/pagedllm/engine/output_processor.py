"""The engine's output side: the tokens a step sampled appended to their sequences, the checks that end a
sequence (stop strings on the text, EOS and stop token ids, max_tokens, max_model_len), when a sequence's
new tokens go out (`stream_interval`, or once at the end), and the RequestDelta that carries them. A step may
hand it several tokens per sequence; nothing after the token that ends a sequence is kept."""
from __future__ import annotations

from collections.abc import Sequence as Tokens

from pagedllm.engine.sequence import FinishReason, OutputKind, RequestDelta, Sequence, TokenLogprobs


class OutputProcessor:
    def __init__(self, eos_token_ids: list[int], max_model_len: int, stream_interval: int = 1) -> None:
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len
        self.stream_interval = stream_interval

    def append(self, seq: Sequence, tokens: Tokens[int], logprobs: Tokens[TokenLogprobs | None],
               now: float) -> FinishReason | None:
        """Append `tokens` in order until one ends the sequence; returns why it ended, else None."""
        seq.first_token_time = seq.first_token_time or now
        for token, token_logprobs in zip(tokens, logprobs):
            seq.token_ids.append(token)
            if token_logprobs is not None:
                seq.logprobs.append(token_logprobs)
            stopped_on_text = seq.detokenizer.add_token(token)
            reason = self.finish_reason(seq, token, stopped_on_text)
            if reason is not None:
                return reason
        return None

    def finish_reason(self, seq: Sequence, token: int, stopped_on_text: bool) -> FinishReason | None:
        """Whether `token`, just appended, ends the sequence."""
        p, num_output_tokens = seq.params, seq.num_output_tokens
        if stopped_on_text:
            return FinishReason.STOP
        if num_output_tokens >= p.min_tokens and (
                token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return FinishReason.STOP
        if num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def ready_to_send(self, seq: Sequence) -> bool:
        """Whether a sequence's new tokens go out now: the first at once, then every `stream_interval`; with
        OutputKind.FINAL_ONLY, all of them when it finishes."""
        finished = seq.finished
        if finished or seq.output_kind is OutputKind.FINAL_ONLY:
            return finished
        return seq.num_sent_tokens == 0 or seq.num_output_tokens - seq.num_sent_tokens >= self.stream_interval

    def take_delta(self, seq: Sequence) -> RequestDelta:
        """Everything not yet handed out: the tokens since the last delta and the text they complete."""
        sent, seq.num_sent_tokens = seq.num_sent_tokens, seq.num_output_tokens
        queue_time = None
        if seq.finished and seq.first_scheduled_time is not None:
            queue_time = seq.first_scheduled_time - seq.arrival_time
        return RequestDelta(
            request_id=seq.request_id, new_token_ids=seq.token_ids[seq.num_prompt_tokens + sent:],
            new_text=seq.detokenizer.take_delta(seq.finished), finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            new_logprobs=seq.logprobs[sent:] if seq.params.logprobs is not None else None, queue_time=queue_time)
