"""pagedllm: a paged-KV, continuous-batching LLM engine served on NVIDIA Triton Inference Server."""
from pagedllm.engine.config import EngineConfig
from pagedllm.engine.sampling_params import SamplingParams
from pagedllm.engine.sequence import RequestDelta, RequestOutput

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "RequestDelta"]


def __getattr__(name: str):  # LLM pulls in torch and transformers: import it only when asked
    if name == "LLM":
        from pagedllm.llm import LLM
        return LLM
    raise AttributeError(name)
