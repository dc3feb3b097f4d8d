from pagedllm.engine.models.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
