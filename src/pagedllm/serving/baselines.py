"""The two baselines of perf/compare.py, served by the same tritonserver as pagedllm: transformers
`generate` one request at a time (`hf_naive`), and on padded batches formed by Triton's dynamic batcher
(`hf_batched`). They take the same requests as the llm model and answer once, at the end (no streaming)."""
from __future__ import annotations

import json
from typing import Any

import torch

from pagedllm.engine.sequence import FinishReason
from pagedllm.engine.tokenizer import load_tokenizer
from pagedllm.errors import InvalidRequestError
from pagedllm.serving.request import GenerateRequest, parse_request
from pagedllm.serving.response import RawResponse, requested_outputs, shape_response
from pagedllm.serving.tokenization import tokenize_request
from pagedllm.weights import resolve_model_path


def load_hf(model: str, dtype: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(model)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return hf, load_tokenizer(path)


def generate_padded(hf: Any, pad_id: int, prompts: list[list[int]], max_new_tokens: int,
                    min_new_tokens: int) -> list[list[int]]:
    """Greedy `generate` on one left-padded batch; each row's new tokens, up to the first EOS after the minimum."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=pad_id)
    return [row[width:].tolist() for row in out]


class HFBaselineModel:
    """`hf_naive` (max_batch_size 0: Triton hands it one request at a time) or `hf_batched` (the dynamic
    batcher hands it several; inputs carry a batch dimension of 1 each). Greedy only."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb
        self.pb = pb
        config = json.loads(args["model_config"])
        self.batched = config.get("max_batch_size", 0) > 0
        self.input_names = [i["name"] for i in config["input"]]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.hf, self.tokenizer = load_hf(params.get("model", "default"), params.get("dtype", "bfloat16"))
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    def execute(self, requests: list[Any]) -> list[Any]:
        parsed: list[GenerateRequest | str] = [self._parse(r) for r in requests]
        good = [p for p in parsed if isinstance(p, GenerateRequest)]
        outputs = iter(self._generate(good) if good else [])
        return [self._error(p) if isinstance(p, str) else self._response(p, next(outputs)) for p in parsed]

    def _parse(self, request: Any) -> GenerateRequest | str:
        inputs = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()[0] if self.batched else tensor.as_numpy()
        try:
            req = parse_request(inputs)
            tokenize_request(self.tokenizer, req)
            return req
        except InvalidRequestError as e:
            return str(e)

    def _generate(self, reqs: list[GenerateRequest]) -> list[list[int]]:
        longest = max(r.params.max_tokens for r in reqs)
        floor = max(r.params.max_tokens if r.params.ignore_eos else r.params.min_tokens for r in reqs)
        rows = generate_padded(self.hf, self.pad, [r.input_ids for r in reqs], longest, floor)
        return [_own_tokens(row, r, self.eos) for row, r in zip(rows, reqs)]

    def _response(self, req: GenerateRequest, tokens: list[int]) -> Any:
        reason = FinishReason.LENGTH if len(tokens) >= req.params.max_tokens else FinishReason.STOP
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        raw = RawResponse(text, reason, len(req.input_ids or []), len(tokens), None)
        tensors = shape_response(raw.to_tensors(requested_outputs(req.options)), req.options)
        if self.batched:
            tensors = {k: v[None] for k, v in tensors.items()}
        return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor(k, v) for k, v in tensors.items()])

    def _error(self, message: str) -> Any:
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))


def _own_tokens(row: list[int], req: GenerateRequest, eos: int) -> list[int]:
    """The batch ran to its longest request: cut this row at its own max_tokens and first EOS."""
    row = row[:req.params.max_tokens]
    if not req.params.ignore_eos and eos in row[req.params.min_tokens:]:
        row = row[:row.index(eos, req.params.min_tokens) + 1]
    return row
