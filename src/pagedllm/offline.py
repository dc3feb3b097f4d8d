"""LLM: the offline interface (many prompts in, their outputs back, no server), in vLLM's shape."""
from __future__ import annotations

import itertools
from typing import Any

from tqdm.auto import tqdm

from pagedllm.engine.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.lora import LoRARequest
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import OutputKind, RequestOutput


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`lora_request`: the adapter every prompt runs with, or one (or None) per prompt, as in vLLM."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        token_lists = [self.engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(token_lists, params, use_tqdm, lora_request)

    def chat(self, messages_list: list[list[dict[str, Any]]] | list[dict[str, Any]],
             params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True,
             lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        if messages_list and isinstance(messages_list[0], dict):
            messages_list = [messages_list]  # type: ignore[list-item]
        return self._run([self.engine.apply_chat_template(m) for m in messages_list], params, use_tqdm, lora_request)

    def _run(self, token_lists: list[list[int]], params: SamplingParams | list[SamplingParams] | None,
             use_tqdm: bool, lora_request: LoRARequest | list[LoRARequest | None] | None) -> list[RequestOutput]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError(f"params: {len(params_list)} SamplingParams for {len(token_lists)} prompts")
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(token_lists)
        if len(loras) != len(token_lists):
            raise ValueError(f"lora_request: {len(loras)} adapters for {len(token_lists)} prompts")
        for tokens, p, lora in zip(token_lists, params_list, loras):
            self.engine.validate(tokens, p)
            if lora is not None:
                self.engine.load_lora(lora)
        ids = [str(next(self._ids)) for _ in token_lists]
        seqs = {}
        for request_id, tokens, p, lora in zip(ids, token_lists, params_list, loras):
            self.engine.add_request(request_id, tokens, p, lora_request=lora, output_kind=OutputKind.FINAL_ONLY)
            seqs[request_id] = self.engine.requests[request_id]
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                bar.update(sum(d.finished for d in self.engine.step()))
        return [RequestOutput.from_sequence(seqs[i]) for i in ids]
