"""Builds one flat, unpadded batch per step and runs the model on it.

Order in the flat batch: every sequence computing one generated token (decodes) first, attended as one
group; then each prefill chunk (a prompt's last token alone included) or speculative run, a group of its own.
Logits are computed only for the rows that sample (sequences whose every token is computed after this step).
The batch is Python's lists: the C++ kernels' step takes them as they are, the other paths make tensors of them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.engine.attention import CacheGeometry, QueryGroup, build_metadata, kernel_metadata_lists, packed
from pagedllm.engine.backends import BACKENDS, Backend
from pagedllm.engine.config import ModelConfig
from pagedllm.engine.huge_pages import HugePageArena
from pagedllm.engine.lora import LoRABank, LoRARows
from pagedllm.engine.models import LlamaForCausalLM
from pagedllm.engine.sampler import takes_argmax
from pagedllm.engine.sequence import Sequence


@dataclass
class ModelInput:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]  # each token's flat cache slot
    groups: list[QueryGroup]
    sample_indices: list[int]
    sampling_seqs: list[Sequence]
    num_sample_rows: list[int]  # per sampling sequence: 1, plus one per draft token
    lora_slots: list[int] | None = None  # each row's adapter slot (-1: the base model), where any row has one
    takes_argmax: bool = False  # every sampling sequence takes its logits' most likely token (sampler.takes_argmax)


@dataclass
class StepLogits:
    logits: torch.Tensor  # float32 [sampled rows, vocab]
    argmax: list[int] | None = None  # the sampled rows' most likely tokens, where the kernels found them


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, backend: Backend = BACKENDS["torch"],
                 lora: LoRABank | None = None, kv_cache_dtype: str = "auto") -> None:
        """`model` as `backend` installed it (backends.py); `lora`: the adapters' bank, where the engine has one;
        `kv_cache_dtype` "int8": the cache as codes and scales (kv_quant.py), else in `dtype`."""
        self.model, self.config, self.backend, self.lora = model, config, backend, lora
        self.block_size, self.dtype, self.device = block_size, dtype, device
        int8 = kv_cache_dtype == "int8"
        self.geometry = CacheGeometry(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                                      num_blocks, block_size, int8)
        # Zeroed, not empty: padded context rows are masked, but NaN garbage would still poison the sums. On the CPU
        # in huge pages (huge_pages.py), which a long context's attention reads faster.
        cache_dtype, layers = torch.int8 if int8 else dtype, config.num_hidden_layers
        self.kv_arena = (HugePageArena(layers * HugePageArena.nbytes(self.geometry.shape, cache_dtype))
                         if device.type == "cpu" else None)
        self.kv_caches = [self.kv_arena.take(self.geometry.shape, cache_dtype) if self.kv_arena is not None
                          else torch.zeros(self.geometry.shape, dtype=cache_dtype, device=device)
                          for _ in range(layers)]

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> ModelInput:
        # Every row's work here runs once a step per sequence: plain loops and fields, few calls (each costs a
        # microsecond or more, the weights' pass having pushed the interpreter's code out of the caches).
        decodes: list[tuple[Sequence, int]] = []
        others: list[tuple[Sequence, int]] = []
        for item in scheduled:
            (decodes if _decodes(*item) else others).append(item)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        sampling: list[Sequence] = []
        rows: list[int] = []
        lora_slots: list[int] = []
        groups = [QueryGroup(0, len(decodes), 1, [s.block_table for s, _ in decodes],
                             [s.num_computed_tokens + 1 for s, _ in decodes])] if decodes else []
        bs, argmax = self.block_size, True
        for i, (seq, n) in enumerate(decodes + others if others else decodes):
            if self.lora is not None:
                lora_slots += [self.lora.slot_of(seq.lora_name) if seq.lora_name else -1] * n
            start, table, drafts = seq.num_computed_tokens, seq.block_table, seq.draft_token_ids
            tokens = seq.token_ids + drafts if drafts else seq.token_ids
            if i >= len(decodes):  # a prefill chunk or a speculative run: a group of its own
                groups.append(QueryGroup(len(ids), 1, n, [table], [start + n], prefill=start < seq.num_prompt_tokens))
            ids += tokens[start:start + n]
            positions += range(start, start + n)
            for p in range(start, start + n):
                slots.append(table[p // bs] * bs + p % bs)
            if start + n == len(tokens):
                rows.append(1 + len(drafts))
                sample_indices += range(len(ids) - rows[-1], len(ids))
                sampling.append(seq)
                argmax = argmax and takes_argmax(seq)
        return ModelInput(ids, positions, slots, groups, sample_indices, sampling, rows,
                          lora_slots if self.lora is not None and any(s >= 0 for s in lora_slots) else None, argmax)

    def execute(self, inp: ModelInput) -> StepLogits:
        model = self.model
        if model.kernel_layers is not None:  # the whole step in the C++ kernels' one call, on the lists as they are
            # a greedy batch's argmax too, in the threads that wrote the logits: numpy's over the whole rows
            # afterwards took 27 us of a batch-1 step
            logits, argmax = model.forward_step(inp.input_ids, inp.positions, self.kv_caches,
                                                kernel_metadata_lists(inp.slot_mapping, inp.groups),
                                                inp.sample_indices, inp.lora_slots, inp.takes_argmax)
            return StepLogits(logits, argmax if inp.takes_argmax else None)
        meta = build_metadata(inp.slot_mapping, inp.groups, self.geometry, self.dtype, self.device,
                              self.backend.kernel_metadata_only)
        input_ids, positions, sample_indices = packed(inp.input_ids + inp.positions + inp.sample_indices,
                                                      [len(inp.input_ids)] * 2 + [len(inp.sample_indices)], np.int64,
                                                      self.device)
        lora = LoRARows(torch.tensor(inp.lora_slots, dtype=torch.int32)) if inp.lora_slots else None
        logits = model(input_ids, positions, self.kv_caches, meta, sample_indices, lora)
        return StepLogits(logits if logits.device.type == "cpu" else logits.cpu())


def _decodes(seq: Sequence, n: int) -> bool:
    """It computes one generated token this step (a prompt's last token is prefill, even alone; a preempted sequence
    recomputes from its start)."""
    return n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens
