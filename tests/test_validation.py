"""Bad prompts and engine settings raise ValueError naming the field before anything is scheduled; the engine
stays healthy. (Sampling parameters: tests/test_sampling_params.py.)"""
from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams


def test_bad_prompts_rejected_and_engine_keeps_serving(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama-tied")), dtype="float32", block_size=4, max_model_len=64)
    ok = SamplingParams(temperature=0, max_tokens=3)
    for prompt, field in [([], "prompt"), ([1] * 64, "prompt"), ([10 ** 9], "prompt_token_ids")]:
        with pytest.raises(ValueError, match=field):
            llm.generate([[5, 6], prompt], ok, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.num_blocks
    assert len(llm.generate([[5, 6, 7]], ok, use_tqdm=False)[0].token_ids) == 3


def test_unsupported_architecture_names_supported_ones(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=8, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_bad_engine_settings_name_the_field(tiny_model_dir):
    from pagedllm.engine.config import EngineConfig
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="fast")
    with pytest.raises(ValueError, match="quantization: int8 runs on the CPU kernels"):
        LLM(str(tiny_model_dir("llama-tied")), quantization="int8", attention_backend="torch")
