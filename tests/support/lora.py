"""PEFT adapters for the tests, and their oracle: transformers running the PEFT model."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(model_dir: Path, out: Path, rank: int, targets: list[str], seed: int, **config) -> Path:
    """A PEFT adapter with seeded random A and B (init_lora_weights=False: B is not zero)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=config.pop("lora_alpha", 2 * rank),
                                           target_modules=targets, init_lora_weights=False, **config))
    peft.save_pretrained(out)
    return out


def peft_greedy(model_dir: Path, adapter: Path | None, prompts: list[list[int]], n: int, merged: bool = False):
    """The oracle: transformers generate on the PEFT model (or on the merged one), one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if merged:
            model = model.merge_and_unload()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                               pad_token_id=0, eos_token_id=None)
            outs.append(y[0, len(ids):].tolist())
    return outs
