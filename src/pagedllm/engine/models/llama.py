"""The Llama family (Llama 2/3, Mistral, Qwen2) in plain PyTorch, with fused qkv and gate/up projections."""
from __future__ import annotations

import math
from collections.abc import Iterable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.engine.attention import AttentionMetadata, KernelMetadataLists, TorchPagedAttention
from pagedllm.engine.config import ModelConfig
from pagedllm.engine.kernels.cpu_isa import CpuPlan
from pagedllm.engine.lora import MODULES, BankModule, LoRABank, LoRARows, add_lora


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised in float32, scaled in the model's dtype, as transformers does.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_inv_freq(inv_freq, scaling)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        # On the CPU wherever the model is built: on meta, torch's Python reference of arange would run, whose
        # first use imports torch._dynamo (0.7-1.0 s of every engine start).
        freqs = torch.arange(max_positions, dtype=torch.float32, device="cpu")[:, None] * rope_inv_freq(config)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.qkv_proj = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.q_size, c.hidden_size, bias=False)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.attn = TorchPagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.lora: dict[str, BankModule] | None = None  # this layer's adapter slots (lora.py), if any

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata, lora: LoRARows | None = None) -> torch.Tensor:
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self._linear("qkv_proj", self.input_layernorm(x), lora).view(x.shape[0], heads + 2 * kv_heads,
                                                                             self.head_dim)
        qk = apply_rope(qkv[:, :heads + kv_heads], *rope)  # queries and keys rotated in one pass
        kv = torch.cat((qk[:, heads:], qkv[:, heads + kv_heads:]), dim=1)
        attn = self.attn.forward(qk[:, :heads], kv, kv_cache, meta)
        x = x + self._linear("o_proj", attn, lora)
        gate, up = self._linear("gate_up_proj", self.post_attention_layernorm(x), lora).chunk(2, dim=-1)
        return x + self._linear("down_proj", F.silu(gate) * up, lora)

    def _linear(self, name: str, x: torch.Tensor, lora: LoRARows | None) -> torch.Tensor:
        y = getattr(self, name)(x)
        if lora is not None:
            add_lora(y, x, self.lora[name], lora)
        return y


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        # Built empty (the weights replace it): a random start on meta would run torch's Python normal_ (as above).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config, max_positions)
        self.kernel_layers: list | None = None  # the C++ decoder layers, once use_cpu_kernels ran
        self.kernel_head = None  # and the C++ final norm and LM head
        self.cpu_isa: str | None = None  # the kernels' tier, likewise
        self.kernel_ops: ModuleType | None = None  # and their module (the sampler's passes over whole rows too)
        self.kernel_lora: list | None = None  # the C++ view of the LoRA bank's layers, once use_lora ran on kernels
        self.kernel_model = None  # all of the above and the KV caches, as the C++ step reads them (kernel_model_for)
        self._kernel_model_caches: list[torch.Tensor] | None = None

    def use_cpu_kernels(self, linear_kind: str, ops: ModuleType, plan: CpuPlan) -> None:
        """Run on pagedllm's CPU kernels (`ops`, one tier's build): every linear on packed weights of
        `linear_kind` (kernels/cpu.py), and every step as one C++ call for all layers, fetching what they read as
        `plan` says for this CPU. The LM head gets its own packed copy; the final norm and the LM head run in the
        same call."""
        from pagedllm.engine.kernels import cpu as cpu_kernels
        cpu_kernels.swap_linears(self, linear_kind, ops, plan.non_temporal_weights)
        self.kv_fetch_ahead = plan.fetches_kv_ahead
        self.cpu_isa, self.kernel_ops = ops.isa, ops
        c = self.config
        self.kernel_layers = [
            ops.DecoderLayer(layer.qkv_proj.op, layer.o_proj.op, layer.gate_up_proj.op, layer.down_proj.op,
                             layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                             c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps,
                             c.head_dim ** -0.5)
            for layer in self.layers]
        self.kernel_head = ops.ModelHead(self.norm.weight.detach(), self.lm_head.op, c.rms_norm_eps)
        self._forward_step = ops.forward_step
        self._kernel_model_caches = None  # a Model of these layers is made at the next step

    def kernel_model_for(self, kv_caches: list[torch.Tensor]):
        """The C++ step's model (kernels' Model) over `kv_caches`: made at the first step on them, then kept."""
        if self._kernel_model_caches is not kv_caches:
            self.kernel_model = self.kernel_ops.Model(self.kernel_layers, self.kernel_head, self.embed_tokens.weight,
                                                      self.rotary.cos, self.rotary.sin, kv_caches,
                                                      self.kernel_lora or [], self.kv_fetch_ahead)
            self._kernel_model_caches = kv_caches
        return self.kernel_model

    def use_lora(self, bank: LoRABank) -> None:
        """Apply the adapters of `bank`'s slots to the rows a step names them for."""
        for layer, modules in zip(self.layers, bank.layers):
            layer.lora = modules
        if self.kernel_ops is not None:
            ops = self.kernel_ops
            self.kernel_lora = [ops.LoRALayer(*(ops.LoRAModule(m.a, m.bt, m.slice_ends) for m in
                                                (modules[name] for name in MODULES))) for modules in bank.layers]
            self._kernel_model_caches = None  # the C++ model is made again, with them

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata, sample_indices: torch.Tensor, lora: LoRARows | None = None) -> torch.Tensor:
        """Flat, unpadded batch in; float32 logits out for the `sample_indices` rows only. `lora`: the rows that
        run with an adapter (use_lora), None where none does. The engine's runner calls forward_step directly
        where the kernels run; this takes their step too, for metadata with `kernel` set."""
        if self.kernel_layers is not None and meta.kernel is not None:
            k = meta.kernel
            return self.forward_step(
                input_ids.tolist(), positions.tolist(), kv_caches,
                KernelMetadataLists(k.slot_mapping.tolist(), k.block_tables.tolist(), k.token_seq.tolist(),
                                    k.context_lens.tolist(), k.prefill_seqs.tolist()),
                sample_indices.tolist(), lora.slots.tolist() if lora is not None else None)[0]
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope, kv, meta, lora)
        return self.lm_head(self.norm(x.index_select(0, sample_indices))).float()

    def forward_step(self, input_ids: list[int], positions: list[int], kv_caches: list[torch.Tensor],
                     meta: KernelMetadataLists, sample_indices: list[int], lora_slots: list[int] | None = None,
                     greedy: bool = False) -> tuple[torch.Tensor, list[int]]:
        """A whole step in the C++ kernels' one call (use_cpu_kernels ran), the embedding and the head too, on the
        model runner's lists: no tensor is made in Python, whose ops each cost 15-25 us after the step's weights
        have pushed their code out of the caches. The sampled rows' float32 logits, and with `greedy` their most
        likely tokens (none otherwise). `lora_slots`: each row's adapter slot (-1: none), or None for no adapters."""
        return self._forward_step(self.kernel_model_for(kv_caches), input_ids, positions, meta.slot_mapping,
                                  meta.block_tables, meta.token_seq, meta.prefill_seqs, meta.context_lens,
                                  sample_indices, lora_slots, greedy)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target = _target(name)
            if target is None:
                continue
            pname, offset = target
            if pname == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            _copy_into(params[pname], pname, tensor, offset, self.config, name)
            loaded.add(pname if offset is None else f"{pname}#{offset}")
        missing = _expected(self.config) - loaded
        if missing:
            raise ValueError(f"model: checkpoint lacks tensors {sorted(missing)[:5]}")


_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _target(name: str) -> tuple[str, int | None] | None:
    """Map a Hugging Face tensor name to (our parameter, shard index within a fused one)."""
    name = name.removeprefix("model.")
    if "rotary_emb" in name:
        return None
    parts = name.replace(".self_attn.", ".").replace(".mlp.", ".").split(".")
    for i, part in enumerate(parts):
        if part in _FUSED:
            fused, shard = _FUSED[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
    return ".".join(parts), None


def _copy_into(param: torch.Tensor, pname: str, tensor: torch.Tensor, shard: int | None, c: ModelConfig,
               name: str) -> None:
    with torch.no_grad():
        if shard is None:
            if param.shape != tensor.shape:
                raise ValueError(f"model: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
            param.copy_(tensor)
            return
        if "qkv_proj" in pname:
            sizes = [c.num_attention_heads * c.head_dim] + [c.num_key_value_heads * c.head_dim] * 2
        else:
            sizes = [c.intermediate_size] * 2
        start = sum(sizes[:shard])
        param[start:start + sizes[shard]].copy_(tensor)


def _expected(c: ModelConfig) -> set[str]:
    names = {"embed_tokens.weight", "norm.weight"} | (set() if c.tie_word_embeddings else {"lm_head.weight"})
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        names |= {p + s for s in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "o_proj.weight", "down_proj.weight")}
        names |= {p + f"qkv_proj.weight#{s}" for s in range(3)} | {p + f"gate_up_proj.weight#{s}" for s in range(2)}
        if c.attention_bias:
            names |= {p + f"qkv_proj.bias#{s}" for s in range(3)}
    return names
