"""LLMEngine: add_request / abort / step, the synchronous core used offline by LLM and online by EngineLoop."""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from pagedllm.engine import backends
from pagedllm.engine.block_manager import BlockManager
from pagedllm.engine.config import EngineConfig, ModelConfig, load_model_config, num_blocks_for, resolve_max_model_len
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.faults import Faults
from pagedllm.engine.lora import FIELD as LORA_FIELD
from pagedllm.engine.lora import Adapter, LoRABank, LoRARequest
from pagedllm.engine.model_runner import ModelRunner
from pagedllm.engine.models import LlamaForCausalLM
from pagedllm.engine.models.llama import RotaryEmbedding
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.sampler import Sampler
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.scheduler import Scheduler, SchedulerOutput
from pagedllm.engine.sequence import FinishReason, OutputKind, RequestDelta, Sequence, SequenceStatus, TokenLogprobs
from pagedllm.engine.speculative import NgramSpeculator
from pagedllm.engine.structured_output import StructuredOutputs
from pagedllm.engine.tokenizer import encode_chat, encode_text, load_tokenizer
from pagedllm.engine.wire import EngineStats
from pagedllm.errors import ErrorCode, InjectedFault, RequestError, RequestRejectedError
from pagedllm.kv_events import ROOT
from pagedllm.weights import iter_safetensors, resolve_model_path

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, faults: Faults | None = None) -> None:
        self.config, self.faults = config, faults or Faults()
        self.step_faults = self.faults.in_steps  # read once: Faults is frozen, and every step asks
        self.model_path = resolve_model_path(config.model)
        self.model_config = load_model_config(self.model_path)
        self.tokenizer = load_tokenizer(self.model_path)
        self.device = config.resolved_device()
        self.num_blocks = num_blocks_for(config, self.model_config)
        self.max_model_len = resolve_max_model_len(config, self.model_config, self.num_blocks)
        self.eos_token_ids = _eos_ids(self.model_config, self.tokenizer)
        backend = backends.resolve(config)
        if config.quantization and not backend.runs_int8:
            raise ValueError(f"quantization: {config.quantization} runs on the CPU kernels only "
                             f"(attention_backend cpu); this engine resolved to {backend.name}")
        if config.kv_cache_dtype == "int8" and not backend.runs_int8_kv:
            raise ValueError(f"kv_cache_dtype: int8 runs on the CPU kernels and the torch backend; this engine "
                             f"resolved to {backend.name}: use kv_cache_dtype auto there")
        model = _load_model(self.model_path, self.model_config, self.max_model_len, config.torch_dtype, self.device)
        self.compute_path = backend.install(model, config)  # what runs the model, for the logs
        logger.info("%s", self.compute_path)
        self.lora = LoRABank(self.model_config, config.max_loras, config.max_lora_rank) if config.enable_lora else None
        if self.lora is not None:
            model.use_lora(self.lora)
            for name, path in config.lora_modules.items():  # a bad one fails the start, naming it
                try:
                    self.lora.register(LoRARequest(name, path))
                except RequestRejectedError as e:
                    raise ValueError(f"lora_modules.{name}: {e.reason}") from None
        self.runner = ModelRunner(model, self.model_config, self.num_blocks, config.block_size,
                                  config.torch_dtype, self.device, backend, self.lora, config.kv_cache_dtype)
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.lora)
        self.sampler = Sampler(config.seed, model.kernel_ops)
        self.output = OutputProcessor(self.eos_token_ids, self.max_model_len, config.stream_interval)
        self.speculator = (NgramSpeculator(config.speculative_config, self.max_model_len)
                           if config.speculative_config is not None else None)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
                                            config.constraint_compile_timeout)
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0
        # The objects of the load (torch, transformers, the tokenizer) never die: frozen, Python's full collections
        # stop walking them (perf over a load and 63 decode steps of 32 rows, AVX2 tier: 6.1% of the samples in the
        # collector without this, 3.2% with it, that rest during the load).
        gc.collect()
        gc.freeze()
        logger.info("engine ready: %s, %s on %s, %d KV blocks of %d tokens (%s), max_model_len %d",
                    self.model_path.name, _dtype_label(config), self.device, self.num_blocks, config.block_size,
                    config.resolved_kv_cache_dtype(),
                    self.max_model_len)

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestRejectedError naming the field if the request can never run; touches no state."""
        if not isinstance(params, SamplingParams):
            raise RequestRejectedError("sampling_parameters", "expected SamplingParams")
        if not prompt_token_ids:
            raise RequestRejectedError("prompt", "is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise RequestRejectedError("prompt_token_ids", f"every id must be an integer in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejectedError(
                "prompt", f"{len(prompt_token_ids)} tokens leave no room to generate within max_model_len "
                f"{self.max_model_len}")
        if params.max_tokens is not None and len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestRejectedError(
                "max_tokens", f"{params.max_tokens} with a prompt of {len(prompt_token_ids)} tokens is over "
                f"max_model_len {self.max_model_len}; ask for at most {self.max_model_len - len(prompt_token_ids)}")
        if params.structured_outputs is not None:
            self.structured.compile(params.structured_outputs)  # compiled here, in the caller's thread, and cached

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None,
                    output_kind: OutputKind = OutputKind.DELTA) -> None:
        """`lora_request`: the adapter it runs with (read from its path the first time), None for the base model;
        `output_kind`: whether its deltas go out as it runs or once, when it finishes."""
        if request_id in self.requests:
            raise RequestRejectedError("request_id", f"{request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        adapter = self.load_lora(lora_request) if lora_request is not None else None
        if params.max_tokens is None:
            params = replace(params, max_tokens=self.max_model_len - len(prompt_token_ids))
        detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                       params.skip_special_tokens, params.include_stop_str_in_output)
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        seq = Sequence(request_id, list(prompt_token_ids), params, detok,
                       arrival_time if arrival_time is not None else time.monotonic(), generator,
                       lora_name=adapter and adapter.name, cache_root=adapter.cache_root if adapter else ROOT,
                       output_kind=output_kind)
        self.structured.start(seq)
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def load_lora(self, request: LoRARequest, pinned: bool = False) -> Adapter:
        """Register the adapter `request` names (read and checked the first time; RequestRejectedError naming
        lora_request otherwise); a pinned one keeps its slot once it has one."""
        if self.lora is None:
            raise RequestRejectedError(LORA_FIELD, "this engine runs without LoRA adapters; start it with "
                                                   "enable_lora")
        return self.lora.register(request, pinned)

    def unload_lora(self, name: str) -> None:
        """Forget adapter `name` (refused while requests run with it)."""
        if self.lora is None:
            raise RequestRejectedError(LORA_FIELD, "this engine runs without LoRA adapters")
        users = sum(seq.lora_name == name for seq in self.requests.values())
        if users:
            raise RequestRejectedError(f"{LORA_FIELD}.name", f"adapter {name!r} has {users} requests in the engine; "
                                                             "unload it once they finish")
        self.lora.unregister(name)

    def abort(self, request_id: str) -> RequestDelta | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return self.output.take_delta(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def encode(self, prompt: str) -> list[int]:
        return encode_text(self.tokenizer, prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)[1]

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
            self.structured.cut_drafts(self.scheduler.running)
        out = self.scheduler.schedule()
        self.num_preemptions += out.num_preempted
        if not out.scheduled:
            return []
        if self.step_faults:
            self._inject("kill_loop_seed", out)
        try:
            return self._run(out)
        except Exception as e:  # a failed step fails the requests it ran, and only those
            logger.exception("engine step failed; failing its %d requests", len(out.scheduled))
            return [self._fail(seq, f"engine step failed: {type(e).__name__}: {e}") for seq, _ in out.scheduled]

    def _fail(self, seq: Sequence, message: str) -> RequestDelta:
        seq.draft_token_ids = []
        if not seq.finished:
            self._finish(seq, FinishReason.ABORT)
        return replace(self.output.take_delta(seq), error=RequestError(ErrorCode.INTERNAL, message))

    def _inject(self, kind: str, out: SchedulerOutput) -> None:
        seed = getattr(self.faults, kind)
        if seed is not None and any(seq.params.seed == seed for seq, _ in out.scheduled):
            raise InjectedFault(f"{kind} {seed}")

    def _run(self, out: SchedulerOutput) -> list[RequestDelta]:
        if self.step_faults:
            self._inject("fail_step_seed", out)
        inp = self.runner.prepare(out.scheduled)
        step = self.runner.execute(inp)
        for seq, n in out.scheduled:
            seq.num_computed_tokens += n
            if not seq.draft_token_ids:  # with drafts: once verified, so that hashes cover only kept tokens
                self.block_manager.register_full_blocks(seq)
        rows = inp.sampling_seqs  # a sequence's logits rows: one, and one more for each draft token
        if len(inp.sample_indices) > len(rows):
            rows = [seq for seq, n in zip(inp.sampling_seqs, inp.num_sample_rows) for _ in range(n)]
        if step.argmax is not None:  # every row takes its logits' argmax: no grammar, nothing to mask
            sampled = self.sampler(step.logits, rows, self.eos_token_ids, step.argmax)
        else:
            with torch.inference_mode():  # torch's logits are inference tensors: masking them in place needs this mode
                self.structured.mask(step.logits, inp.sampling_seqs, inp.num_sample_rows)
                sampled = self.sampler(step.logits, rows, self.eos_token_ids)
        now, first = time.monotonic(), 0
        for seq, n in zip(inp.sampling_seqs, inp.num_sample_rows):
            self._emit(seq, sampled.token_ids[first:first + n], sampled.logprobs[first:first + n], now)
            first += n
        return [self.output.take_delta(seq) for seq in inp.sampling_seqs if self.output.ready_to_send(seq)]

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprobs | None], now: float) -> None:
        """A sampling sequence's tokens of this step: one, or with drafts the verified run."""
        drafts, seq.draft_token_ids = seq.draft_token_ids, []
        if drafts:
            tokens = self.speculator.verify(drafts, tokens)
        before = len(seq.token_ids)
        reason = self.output.append(seq, tokens, logprobs, now)
        if seq.grammar is not None and self.structured.advance(seq, seq.token_ids[before:]):
            reason = reason or FinishReason.STOP  # the grammar is complete
        if drafts:  # the slots of rejected drafts no longer count, and their blocks go back
            seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids) - 1)
            self.block_manager.trim(seq)
            self.block_manager.register_full_blocks(seq)
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status, seq.finish_reason, seq.finish_time = SequenceStatus.FINISHED, reason, time.monotonic()
        self.scheduler.remove(seq)
        del self.requests[seq.request_id]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        spec = self.speculator
        running, waiting = self.scheduler.running, self.scheduler.waiting
        return EngineStats(len(running), len(waiting), bm.usage, bm.num_free_blocks,
                           bm.num_blocks, bm.prefix_queries, bm.prefix_hits, self.num_preemptions,
                           spec.num_draft_tokens if spec else 0, spec.num_accepted_tokens if spec else 0,
                           *((_adapters(running), _adapters(waiting)) if self.lora else ()))


def _adapters(sequences: Any) -> tuple[str, ...]:
    return tuple(sorted({s.lora_name for s in sequences if s.lora_name}))


def _eos_ids(config: ModelConfig, tokenizer: Any) -> list[int]:
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _load_model(path: Any, config: ModelConfig, max_positions: int, dtype: torch.dtype,
                device: torch.device) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions)
    # storage for the meta tensors: Module.to_empty's empty_like on them imports sympy, 0.3 s of every start
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.tie_weights()
    model.load_weights(iter_safetensors(path))
    model = model.to(dtype=dtype)
    model.rotary = RotaryEmbedding(config, max_positions).to(device)  # computed in float32, never loaded
    return model.eval()


def _dtype_label(config: EngineConfig) -> str:
    return config.dtype if config.dtype != "auto" else f"{config.resolved_dtype()} (dtype auto)"


