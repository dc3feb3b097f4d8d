"""pagedllm: a paged-KV, continuous-batching LLM engine served on NVIDIA Triton Inference Server."""
from importlib import import_module

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "RequestDelta", "LoRARequest"]

# Imported when first asked for: the engine's modules pull in torch, which the gateway and the CLI's
# non-engine commands never need.
_HOMES = {"LLM": "pagedllm.offline", "EngineConfig": "pagedllm.engine.config",
          "SamplingParams": "pagedllm.engine.sampling_params", "RequestOutput": "pagedllm.engine.sequence",
          "RequestDelta": "pagedllm.engine.sequence", "LoRARequest": "pagedllm.engine.lora"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
