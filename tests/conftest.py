"""Shared fixtures: the real SmolLM2 checkpoint and tiny seeded random models built with transformers."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

# Triton kernels run in Triton's interpreter on machines without an NVIDIA GPU; it must be chosen
# before anything imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from pagedllm.weights import ensure_default_model  # noqa: E402

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)

TINY_CONFIGS = {
    "llama3": lambda v: LlamaConfig(vocab_size=v, **_TINY, tie_word_embeddings=False, rope_theta=500000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-tied": lambda v: LlamaConfig(vocab_size=v, **_TINY, tie_word_embeddings=True),
    "mistral": lambda v: MistralConfig(vocab_size=v, **_TINY, sliding_window=None),
    "qwen2": lambda v: Qwen2Config(vocab_size=v, **_TINY, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tokenizer(smollm_dir: Path):
    return AutoTokenizer.from_pretrained(smollm_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """Builds (once per session) a seeded random model of the named architecture; returns its directory.
    A small `vocab_size` makes its output repeat itself (speculative drafts then hit and miss often)."""
    built: dict[tuple[str, int | None], Path] = {}

    def build(name: str, vocab_size: int | None = None) -> Path:
        if (name, vocab_size) not in built:
            torch.manual_seed(1234)
            config = TINY_CONFIGS[name](vocab_size or len(tokenizer))
            config.eos_token_id = None
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[(name, vocab_size)] = path
        return built[(name, vocab_size)]

    return build


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The oracle: transformers `generate`, one prompt at a time (no padding), float32, no EOS stop."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs
