"""The compute backends: what runs a model's linear layers and attention on this machine, chosen once per
engine (`resolve`, from engine.json's `attention_backend`). Everything that differs between them is here;
the engine installs the chosen one into its model, and the model runner asks it which attention metadata a
step needs. A new backend is one class and one entry in BACKENDS."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.engine.config import EngineConfig
    from pagedllm.engine.kernels.cpu_isa import CpuPlan
    from pagedllm.engine.models import LlamaForCausalLM


class Backend:
    name = ""
    runs_int8 = False  # int8 weights (quantization "int8") run here
    runs_int8_kv = True  # an int8 KV cache (kv_cache_dtype "int8") runs here
    kernel_metadata_only = False  # steps read only the kernels' metadata (no torch attention metadata)

    def install(self, model: LlamaForCausalLM, config: EngineConfig) -> str:
        """Fits `model` to this backend; returns what runs it, in words (the engine logs it). Off the CPU
        there is nothing to fit here."""
        if config.resolved_device().type != "cpu":
            return f"{config.resolved_device()}, attention backend {self.name}"
        return self._install_on_cpu(model, config, _fit_cpu_prefill(model, config))

    def _install_on_cpu(self, model: LlamaForCausalLM, config: EngineConfig, plan: CpuPlan) -> str:
        raise NotImplementedError



class TorchBackend(Backend):
    """Plain torch attention; on the CPU, bf16 linears prepacked for oneDNN where the tier has its bf16."""
    name = "torch"

    def _install_on_cpu(self, model: LlamaForCausalLM, config: EngineConfig, plan: CpuPlan) -> str:
        from pagedllm.engine.kernels.prepacked_linear import pack_linears
        if plan.onednn_bf16 and pack_linears(model, batch_hint=64):
            return f"{plan.describe()}; CPU kernels off, linear layers prepacked for oneDNN (bfloat16)"
        return f"{plan.describe()}; CPU kernels off, plain torch in {config.resolved_dtype()}"


class CpuKernelsBackend(Backend):
    """pagedllm's C++ kernels for the CPU's tier: every linear, and whole steps in one call. A bfloat16 cache is
    in the kernels' own layout within each block (kernels.h kv_index; cpu.to_kernel_layout)."""
    name = "cpu"
    runs_int8 = True
    # every step, prefill chunks included (attended in query tiles): a 2,048-token prompt takes 2.0 s against 6.1 s
    # with torch attention and its bias tensor (AVX-512 BF16, 2 threads)
    kernel_metadata_only = True

    def _install_on_cpu(self, model: LlamaForCausalLM, config: EngineConfig, plan: CpuPlan) -> str:
        import torch  # not at import: config.py says why

        from pagedllm.engine.kernels import cpu as cpu_kernels
        from pagedllm.engine.kernels.cpu_isa import CpuIsa
        paired = ("int8" if config.kv_cache_dtype == "int8" else
                  "bfloat16" if config.torch_dtype == torch.bfloat16 else None)
        if paired and config.block_size % 2:
            raise ValueError(f"block_size: {config.block_size} is odd; the CPU kernels keep {paired} KV caches' values "
                             "in pairs of positions (kernels.h kv_index): use an even block_size (the default is 16)")
        kind = cpu_kernels.linear_kind(config.torch_dtype, config.quantization)
        ops = cpu_kernels.load(plan.isa)
        model.use_cpu_kernels(kind, ops, plan)
        refused = plan.isa == CpuIsa.AMX and not ops.amx_tiles()
        note = "; the OS refused AMX's tile state: every linear on vdpbf16ps" if refused else ""
        return f"{plan.describe()}; {kind} linears, each step in one C++ call{note}"



class TritonBackend(TorchBackend):
    """Attention in OpenAI Triton kernels over the paged cache; linears as the torch backend runs them (GPU;
    tested on the CPU in Triton's interpreter)."""
    name = "triton"
    kernel_metadata_only = True
    runs_int8_kv = False

    def install(self, model: LlamaForCausalLM, config: EngineConfig) -> str:
        from pagedllm.engine.kernels.gpu_attention import GpuPagedAttention
        path = super().install(model, config)
        for layer in model.layers:
            layer.attn = GpuPagedAttention(layer.num_heads, layer.num_kv_heads, layer.head_dim)
        return path



BACKENDS: dict[str, Backend] = {b.name: b for b in (TorchBackend(), CpuKernelsBackend(), TritonBackend())}


def resolve(config: EngineConfig) -> Backend:
    """The backend asked for, or for "auto": Triton on a GPU where it is installed, the CPU kernels where they
    build for this CPU's tier, else torch."""
    if config.attention_backend != "auto":
        return BACKENDS[config.attention_backend]
    if config.resolved_device().type == "cuda":
        import importlib.util
        return BACKENDS["triton" if importlib.util.find_spec("triton") is not None else "torch"]
    from pagedllm.engine.kernels import cpu as cpu_kernels
    return BACKENDS["cpu" if cpu_kernels.available(config.cpu_plan().isa) else "torch"]


def _fit_cpu_prefill(model: LlamaForCausalLM, config: EngineConfig) -> CpuPlan:
    """The CPU plan; bf16 prefill attention in float32 where the tier has no oneDNN bf16 (torch's bf16 bmm is
    a slow loop without it)."""
    import torch  # not at import: config.py says why
    plan = config.cpu_plan()
    if config.torch_dtype == torch.bfloat16 and not plan.onednn_bf16:
        for layer in model.layers:
            layer.attn.compute_dtype = torch.float32
    return plan
